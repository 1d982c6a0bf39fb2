#!/usr/bin/env bash
# strongSwan 5.9 with kernel-libipsec (userspace ESP over a TUN device, always
# UDP-encapsulated) as the comparison tunnel of scripts/bench-e2e.sh, on the
# namespaces of scripts/topo.sh: one charon per gateway namespace, each in a
# private mount namespace with its own /run (charon's pid file is fixed),
# IKEv2 with a PSK, ESP AES-GCM-128 for 198.18.1.0/24 <-> 198.18.2.0/24.
#   scripts/strongswan-peer.sh up|down PREFIX WORKDIR
set -euo pipefail
cmd=$1 P=$2 W=$3
CHARON=/usr/lib/ipsec/charon

conf() { # gw local remote lts rts
    mkdir -p "$W/$1"
    cat >"$W/$1/strongswan.conf" <<CONF
charon {
  load = openssl random nonce x509 pubkey pem pkcs1 kdf kernel-libipsec kernel-netlink socket-default vici
  install_routes = yes
  filelog {
    log {
      path = $W/$1/charon.log
      default = 1
    }
  }
  plugins {
    vici { socket = unix://$W/$1/vici }
    kernel-libipsec { allow_peer_ts = yes }
  }
}
swanctl { socket = unix://$W/$1/vici }
CONF
    cat >"$W/$1/swanctl.conf" <<CONF
connections {
  site {
    version = 2
    local_addrs = $2
    remote_addrs = $3
    proposals = aes128-sha256-x25519
    local { auth = psk
            id = $1 }
    remote { auth = psk
             id = $([ "$1" = gw1 ] && echo gw2 || echo gw1) }
    children {
      net {
        local_ts = $4
        remote_ts = $5
        esp_proposals = aes128gcm16
        start_action = none
      }
    }
  }
}
secrets {
  ike-1 {
    id-1 = gw1
    id-2 = gw2
    secret = "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  }
}
CONF
}

up() {
    [ -x "$CHARON" ] || { echo "strongswan-peer.sh: $CHARON missing" >&2; exit 1; }
    conf gw1 198.18.0.1 198.18.0.2 198.18.1.0/24 198.18.2.0/24
    conf gw2 198.18.0.2 198.18.0.1 198.18.2.0/24 198.18.1.0/24
    # Both sides must hold the same PSK.
    sed -i '/secret =/d' "$W/gw2/swanctl.conf"
    grep 'secret =' "$W/gw1/swanctl.conf" | sed -i "/id-2 = gw2/r /dev/stdin" "$W/gw2/swanctl.conf"
    for g in gw1 gw2; do
        ip netns exec "$P-$g" unshare -m --propagation private sh -c \
            "mount -t tmpfs none /run && STRONGSWAN_CONF=$W/$g/strongswan.conf exec $CHARON" \
            >"$W/$g/stdout" 2>&1 &
        echo $! >"$W/$g/pid"
    done
    for g in gw1 gw2; do
        for _ in $(seq 50); do [ -S "$W/$g/vici" ] && break; sleep 0.1; done
        STRONGSWAN_CONF=$W/$g/strongswan.conf swanctl --load-all --file "$W/$g/swanctl.conf" >/dev/null
    done
    STRONGSWAN_CONF=$W/gw1/strongswan.conf swanctl --initiate --child net >/dev/null
}

down() {
    for g in gw1 gw2; do
        [ -f "$W/$g/pid" ] && pkill -P "$(cat "$W/$g/pid")" 2>/dev/null || true
        [ -f "$W/$g/pid" ] && kill "$(cat "$W/$g/pid")" 2>/dev/null || true
    done
    sleep 0.5
}

case $cmd in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down PREFIX WORKDIR" >&2; exit 2 ;;
esac
