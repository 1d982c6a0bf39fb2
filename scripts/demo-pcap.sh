#!/usr/bin/env bash
# The offline round trip, as gateways see it:
#
#   site A 198.18.1.0/24 ──► gw1 198.18.0.1 ══ ESP (AES-GCM-128, tunnel) ══► gw2 198.18.0.2 ──► site B 198.18.2.0/24
#   site A 2001:db8:1::/64                                                     site B 2001:db8:2::/64
#
# 1. scapy writes a capture of plaintext site-A traffic (IPv4 and IPv6).
# 2. espd pcap with gw1.conf turns it into ESP.
# 3. tshark decrypts that capture with the same keys: every ICV must be good.
# 4. espd pcap with gw2.conf decapsulates it: the result must equal step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ESPD=${ESPD:-target/release/espd}
PY=${PY:-.venv/bin/python}
work=$(mktemp -d /tmp/espd-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

K_AB=0x$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
K_BA=0x$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
K6=0x$(head -c 36 /dev/urandom | od -An -tx1 | tr -d ' \n')
gcm="aead 'rfc4106(gcm(aes))'"
cat >"$work/gw1.conf" <<CONF
# gw1: protects site A -> site B
state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel $gcm $K_AB 128
state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2000 reqid 2 mode tunnel $gcm $K_BA 128
state add src 2001:db8:ff::1 dst 2001:db8:ff::2 proto esp spi 0x1006 reqid 6 mode tunnel flag esn $gcm $K6 128
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 2001:db8:1::/64 dst 2001:db8:2::/64 dir out tmpl src 2001:db8:ff::1 dst 2001:db8:ff::2 proto esp reqid 6 mode tunnel
CONF
cat >"$work/gw2.conf" <<CONF
# gw2: the mirror image
state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel $gcm $K_AB 128
state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2000 reqid 2 mode tunnel $gcm $K_BA 128
state add src 2001:db8:ff::1 dst 2001:db8:ff::2 proto esp spi 0x1006 reqid 6 mode tunnel flag esn $gcm $K6 128
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir out tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir fwd tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 2001:db8:1::/64 dst 2001:db8:2::/64 dir fwd tmpl src 2001:db8:ff::1 dst 2001:db8:ff::2 proto esp reqid 6 mode tunnel
CONF
target/release/espctl check "$work/gw1.conf"
target/release/espctl check "$work/gw2.conf"

"$PY" - "$work/plain.pcap" <<'PY'
import sys
from scapy.all import Ether, IP, IPv6, UDP, TCP, ICMP, Raw, wrpcap
pkts = []
for i in range(2000):
    size = (64, 512, 1400)[i % 3]
    if i % 4 == 3:
        p = IPv6(src="2001:db8:1::10", dst="2001:db8:2::20") / UDP(sport=4000 + i % 50, dport=9) / Raw(b"v6" * (size // 2))
    elif i % 4 == 2:
        p = IP(src="198.18.1.10", dst="198.18.2.20") / TCP(sport=40000, dport=9, seq=i) / Raw(b"t" * size)
    else:
        p = IP(src="198.18.1.%d" % (10 + i % 5), dst="198.18.2.20") / UDP(sport=5000, dport=9) / Raw(b"u" * size)
    pkts.append(Ether(src="02:00:00:00:0a:01", dst="02:00:00:00:00:01") / p)
pkts.append(Ether() / IP(src="198.18.1.10", dst="198.18.2.20") / ICMP() / b"ping")
wrpcap(sys.argv[1], pkts)
PY

echo "== gw1: encapsulate"
"$ESPD" pcap -c "$work/gw1.conf" -i "$work/plain.pcap" -o "$work/esp.pcap" --stats-json "$work/gw1.json"
echo "== tshark: decrypt gw1's output (IPv4 SA; tshark cannot do ESN, so the IPv6 SA is checked by gw2 only)"
bad=$(tshark -r "$work/esp.pcap" -o esp.enable_encryption_decode:TRUE -o esp.enable_authentication_check:TRUE \
    -o "uat:esp_sa:\"IPv4\",\"198.18.0.1\",\"198.18.0.2\",\"0x00001000\",\"AES-GCM with 16 octet ICV [RFC4106]\",\"$K_AB\",\"NULL\",\"\"" \
    -Y 'esp && ip' -T fields -e esp.icv_good 2>/dev/null | sort | uniq -c)
echo "   tshark ICV good counts: $bad"
[ "$(echo "$bad" | awk '$2=="1"{print $1}')" = 1501 ] || { echo "demo: tshark did not verify every ESP packet" >&2; exit 1; }
echo "== gw2: decapsulate"
"$ESPD" pcap -c "$work/gw2.conf" -i "$work/esp.pcap" -o "$work/back.pcap" --stats-json "$work/gw2.json"
"$PY" - "$work/plain.pcap" "$work/back.pcap" <<'PY'
import sys
from scapy.all import rdpcap
a, b = rdpcap(sys.argv[1]), rdpcap(sys.argv[2])
assert len(a) == len(b), (len(a), len(b))
assert all(bytes(x) == bytes(y) for x, y in zip(a, b)), "round trip changed a packet"
print(f"== round trip: all {len(a)} packets identical after gw1 -> ESP -> gw2")
PY
