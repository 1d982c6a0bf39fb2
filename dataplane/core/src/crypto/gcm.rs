//! AES-GCM for ESP, RFC 4106, composed from vetted RustCrypto primitives:
//! `aes` (AES-NI when present), `ctr` and `ghash` (PCLMULQDQ when present).
//! The mode itself is NIST SP 800-38D §7: no cipher code is written here.
//!
//! Why not a packaged GCM crate: RFC 4106 §6 allows 8- and 12-octet ICVs, which
//! are the 64/96 most significant bits of the full tag (SP 800-38D §5.2.1.2);
//! the packaged crates verify only 12..16-octet tags.
//!
//! With the `ring` feature (the default), SAs with the full 16-octet ICV
//! seal and open through `espd-aead` (ring's one-pass AES-GCM assembly,
//! about twice the speed here; docs/performance.md); truncated ICVs and GMAC
//! stay on this composition, which is also the whole story without the
//! feature (`--no-default-features`: pure Rust).

use super::{AuthError, GmacAad, KeyLenError};
use aes::cipher::{generic_array::GenericArray, BlockEncrypt, InnerIvInit, KeyInit, StreamCipher};
use ghash::universal_hash::UniversalHash;
use ghash::GHash;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// RFC 4106 §3.1: the explicit IV is 8 octets.
pub const IV_LEN: usize = 8;
/// RFC 4106 §4: the salt is the last 4 octets of the keying material.
pub const SALT_LEN: usize = 4;

type Block = GenericArray<u8, aes::cipher::consts::U16>;

// Both variants are kept inline: one SA owns one, and boxing would add a
// pointer chase on every packet.
#[allow(clippy::large_enum_variant)]
enum Cipher {
    Aes128(aes::Aes128),
    Aes256(aes::Aes256),
}

/// The composition of RustCrypto's AES, CTR and GHASH: for truncated
/// ICVs and GMAC, and where ring is not built in. Boxed in [`AesGcm`]: it
/// is rare, and a carrier edge's SAs are all as large as the largest
/// provider.
struct Portable {
    cipher: Cipher,
    ghash: GHash,
    salt: [u8; SALT_LEN],
    icv_len: usize,
}

impl Drop for Portable {
    fn drop(&mut self) {
        // The AES round keys and GHASH key zeroize themselves (crate features).
        self.salt.zeroize();
    }
}

/// An expanded AES-GCM key with its salt and ICV length, on one provider.
///
/// With the fast provider (16-octet ICVs) the composition is not built at
/// all, and ring's key schedule sits inline: an SA's transform is one block
/// with its core, no pointer to follow on a packet, and a carrier edge's
/// 100 000 SAs take one allocation each (docs/performance.md).
pub struct AesGcm(Provider);

// ring's key schedule is 544 octets, the composition a pointer: clippy's
// large-variant rule would box ring's, the one every packet reads.
#[allow(clippy::large_enum_variant)]
enum Provider {
    /// ring's one-pass AES-GCM, for 16-octet ICVs.
    #[cfg(feature = "ring")]
    Ring(espd_aead::RingAead),
    /// The composition, for truncated ICVs, GMAC, or without ring.
    Composition(Box<Portable>),
}

impl AesGcm {
    /// `keymat` is key ‖ salt (20 or 36 octets), `icv_len` is 8, 12 or 16.
    pub fn new(keymat: &[u8], icv_len: usize) -> Result<Self, KeyLenError> {
        let (key, salt) = split(keymat, icv_len)?;
        #[cfg(feature = "ring")]
        if icv_len == espd_aead::TAG_LEN {
            if let Ok(r) = espd_aead::RingAead::new(key, salt) {
                return Ok(AesGcm(Provider::Ring(r)));
            }
        }
        Ok(AesGcm(Provider::Composition(Portable::new(
            key, salt, icv_len,
        ))))
    }

    /// RFC 4543 GMAC (integrity only) with the composition.
    pub fn new_gmac(keymat: &[u8], icv_len: usize) -> Result<Self, KeyLenError> {
        Self::new_composition(keymat, icv_len)
    }

    /// The composition's state: every caller of this is a path ring never
    /// takes (truncated ICVs, GMAC), and `AesGcm::new` builds the
    /// composition wherever ring does not seal.
    fn p(&self) -> &Portable {
        match &self.0 {
            Provider::Composition(p) => p,
            #[cfg(feature = "ring")]
            Provider::Ring(_) => {
                unreachable!("GMAC and truncated ICVs are built on the composition (AesGcm::new)")
            }
        }
    }

    pub fn icv_len(&self) -> usize {
        match &self.0 {
            Provider::Composition(p) => p.icv_len,
            #[cfg(feature = "ring")]
            Provider::Ring(_) => espd_aead::TAG_LEN,
        }
    }

    /// The same key on this composition alone, even for a 16-octet ICV (to
    /// compare providers; espd itself uses [`AesGcm::new`]).
    pub fn new_composition(keymat: &[u8], icv_len: usize) -> Result<Self, KeyLenError> {
        let (key, salt) = split(keymat, icv_len)?;
        Ok(AesGcm(Provider::Composition(Portable::new(
            key, salt, icv_len,
        ))))
    }

    /// Which implementation seals and opens: `"ring"` or `"composition"`.
    pub fn provider(&self) -> &'static str {
        match &self.0 {
            Provider::Composition(_) => "composition",
            #[cfg(feature = "ring")]
            Provider::Ring(_) => "ring",
        }
    }

    /// Key length in bits, for display.
    pub fn key_bits(&self) -> usize {
        match &self.0 {
            Provider::Composition(p) => match p.cipher {
                Cipher::Aes128(_) => 128,
                Cipher::Aes256(_) => 256,
            },
            #[cfg(feature = "ring")]
            Provider::Ring(r) => r.key_bits(),
        }
    }

    /// J0 = salt ‖ IV ‖ 0x00000001 (SP 800-38D §7.1 with a 96-bit nonce).
    fn j0(&self, iv: &[u8; IV_LEN]) -> Block {
        let mut j = Block::default();
        j[..4].copy_from_slice(&self.p().salt);
        j[4..12].copy_from_slice(iv);
        j[15] = 1;
        j
    }

    /// GCTR from inc32(J0) over `data`.
    fn gctr(&self, j0: &Block, data: &mut [u8]) {
        let mut cb = *j0;
        cb[15] = 2;
        match &self.p().cipher {
            Cipher::Aes128(c) => {
                ctr::Ctr32BE::<&aes::Aes128>::from_core(ctr::CtrCore::inner_iv_init(c, &cb))
                    .apply_keystream(data)
            }
            Cipher::Aes256(c) => {
                ctr::Ctr32BE::<&aes::Aes256>::from_core(ctr::CtrCore::inner_iv_init(c, &cb))
                    .apply_keystream(data)
            }
        }
    }

    /// The full 16-octet tag: E(K, J0) ⊕ GHASH(AAD, C, lengths).
    fn tag(&self, j0: &Block, aad: &[u8], ct: &[u8]) -> Block {
        let mut g = self.p().ghash.clone();
        g.update_padded(aad);
        g.update_padded(ct);
        self.finish(g, j0, aad.len(), ct.len())
    }

    /// Appends the lengths block and masks with E(K, J0).
    fn finish(&self, mut g: GHash, j0: &Block, aad_len: usize, ct_len: usize) -> Block {
        let mut lens = Block::default();
        lens[..8].copy_from_slice(&((aad_len as u64) * 8).to_be_bytes());
        lens[8..].copy_from_slice(&((ct_len as u64) * 8).to_be_bytes());
        g.update(&[lens]);
        let mut t = g.finalize();
        let mut mask = *j0;
        match &self.p().cipher {
            Cipher::Aes128(c) => c.encrypt_block(&mut mask),
            Cipher::Aes256(c) => c.encrypt_block(&mut mask),
        }
        for (a, b) in t.iter_mut().zip(mask.iter()) {
            *a ^= b;
        }
        t
    }

    /// RFC 4543: the GMAC tag over an AAD given in pieces, with no plaintext.
    fn gmac_tag(&self, iv: &[u8; IV_LEN], aad: &GmacAad<'_>) -> Block {
        let j0 = self.j0(iv);
        let mut s = Stream::new(self.p().ghash.clone());
        s.feed(aad.spi);
        if let Some(hi) = &aad.hi {
            s.feed(hi);
        }
        s.feed(aad.rest);
        let (g, n) = s.finish();
        self.finish(g, &j0, n, 0)
    }

    /// Writes the (truncated) GMAC tag to `icv`.
    pub fn gmac(&self, iv: &[u8; IV_LEN], aad: &GmacAad<'_>, icv: &mut [u8]) {
        let t = self.gmac_tag(iv, aad);
        let n = self.p().icv_len.min(icv.len());
        icv[..n].copy_from_slice(&t[..n]);
    }

    /// Verifies a GMAC tag in constant time.
    pub fn verify_gmac(
        &self,
        iv: &[u8; IV_LEN],
        aad: &GmacAad<'_>,
        icv: &[u8],
    ) -> Result<(), AuthError> {
        let t = self.gmac_tag(iv, aad);
        let n = self.p().icv_len;
        if icv.len() == n && bool::from(t[..n].ct_eq(icv)) {
            Ok(())
        } else {
            Err(AuthError)
        }
    }

    pub fn seal(&self, iv: &[u8; IV_LEN], aad: &[u8], data: &mut [u8], icv: &mut [u8]) {
        #[cfg(feature = "ring")]
        if let Provider::Ring(r) = &self.0 {
            // The engine passes icv_len() octets: 16 for ring.
            let icv = icv
                .first_chunk_mut::<{ espd_aead::TAG_LEN }>()
                .expect("a 16-octet ICV for a ring key");
            return r.seal(iv, aad, data, icv);
        }
        let j0 = self.j0(iv);
        self.gctr(&j0, data);
        let t = self.tag(&j0, aad, data);
        let n = self.p().icv_len.min(icv.len());
        icv[..n].copy_from_slice(&t[..n]);
    }

    pub fn open(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        data: &mut [u8],
        icv: &[u8],
    ) -> Result<(), AuthError> {
        #[cfg(feature = "ring")]
        if let Provider::Ring(r) = &self.0 {
            let icv = <&[u8; 16]>::try_from(icv).map_err(|_| AuthError)?;
            return r.open(iv, aad, data, icv).map_err(|_| AuthError);
        }
        let n = self.p().icv_len;
        if icv.len() != n {
            return Err(AuthError);
        }
        let j0 = self.j0(iv);
        let t = self.tag(&j0, aad, data);
        // Constant-time comparison of the (truncated) tag.
        if !bool::from(t[..n].ct_eq(icv)) {
            return Err(AuthError);
        }
        self.gctr(&j0, data);
        Ok(())
    }
}

/// Checks the ICV length and splits `keymat` into the AES key and the salt.
fn split(keymat: &[u8], icv_len: usize) -> Result<(&[u8], [u8; SALT_LEN]), KeyLenError> {
    if !matches!(icv_len, 8 | 12 | 16) {
        return Err(KeyLenError);
    }
    let (key, salt) = match keymat.len() {
        20 | 36 => keymat.split_at(keymat.len() - SALT_LEN),
        _ => return Err(KeyLenError),
    };
    let mut s = [0u8; SALT_LEN];
    s.copy_from_slice(salt);
    Ok((key, s))
}

impl Portable {
    fn new(key: &[u8], salt: [u8; SALT_LEN], icv_len: usize) -> Box<Portable> {
        let cipher = match key.len() {
            16 => Cipher::Aes128(aes::Aes128::new(GenericArray::from_slice(key))),
            _ => Cipher::Aes256(aes::Aes256::new(GenericArray::from_slice(key))),
        };
        let mut h = Block::default();
        match &cipher {
            Cipher::Aes128(c) => c.encrypt_block(&mut h),
            Cipher::Aes256(c) => c.encrypt_block(&mut h),
        }
        let ghash = GHash::new(&h);
        h.zeroize();
        Box::new(Portable {
            cipher,
            ghash,
            salt,
            icv_len,
        })
    }
}

/// GHASH over data that arrives in pieces of any length, padded once at the end.
struct Stream {
    g: GHash,
    buf: Block,
    n: usize,
    total: usize,
}

impl Stream {
    fn new(g: GHash) -> Self {
        Stream {
            g,
            buf: Block::default(),
            n: 0,
            total: 0,
        }
    }

    fn feed(&mut self, mut d: &[u8]) {
        self.total += d.len();
        if self.n > 0 {
            let take = (16 - self.n).min(d.len());
            self.buf[self.n..self.n + take].copy_from_slice(&d[..take]);
            self.n += take;
            d = &d[take..];
            if self.n < 16 {
                return;
            }
            self.g.update(&[self.buf]);
            self.n = 0;
        }
        let full = d.len() / 16 * 16;
        // A whole number of blocks: update_padded adds no padding.
        self.g.update_padded(&d[..full]);
        let rest = &d[full..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.n = rest.len();
    }

    /// The GHASH state after zero-padding the last partial block, and the length fed.
    fn finish(mut self) -> (GHash, usize) {
        if self.n > 0 {
            self.buf[self.n..].fill(0);
            self.g.update(&[self.buf]);
        }
        self.buf.zeroize();
        (self.g, self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hex;

    /// draft-mcgrew-gcm-test-01 as carried (seq 1, fixed checksums) in DPDK's
    /// app/test/test_cryptodev_security_ipsec_test_vectors.h `pkt_aes_128_gcm`:
    /// key ‖ salt, IV, AAD = SPI ‖ seq, plaintext = inner packet ‖ pad len 0 ‖ NH 4.
    #[test]
    fn rfc4106_known_answer_128() {
        let key = hex("feffe9928665731c6d6a8f9467308308 cafebabe");
        let iv: [u8; 8] = hex("facedbaddecaf888").try_into().unwrap();
        let aad = hex("0000a5f800000001");
        let pt = hex(
            "4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d00100
             0001000000000000037369700963796265726369747902646b0000010001 0004",
        );
        let want = hex(
            "deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c
             3de81827c10e9a4f51330d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd4
             29c737579ff19e58cffc607a3bce8994",
        );
        let g = AesGcm::new(&key, 16).unwrap();
        let mut data = pt.clone();
        let mut icv = [0u8; 16];
        g.seal(&iv, &aad, &mut data, &mut icv);
        assert_eq!(data, want[..pt.len()]);
        assert_eq!(icv, want[pt.len()..]);
        // Truncated ICVs are the leading octets of the full tag (SP 800-38D §5.2.1.2).
        for n in [8, 12] {
            let t = AesGcm::new(&key, n).unwrap();
            let mut d = pt.clone();
            let mut i = vec![0u8; n];
            t.seal(&iv, &aad, &mut d, &mut i);
            assert_eq!(i, want[pt.len()..pt.len() + n]);
            t.open(&iv, &aad, &mut d, &i).unwrap();
            assert_eq!(d, pt);
        }
        g.open(&iv, &aad, &mut data, &icv).unwrap();
        assert_eq!(data, pt);
    }

    #[test]
    #[cfg(feature = "ring")]
    fn ring_and_the_composition_agree() {
        // 16-octet ICVs go through ring, 12-octet ones through the
        // composition: same ciphertext, and the 12-octet ICV is the 16-octet
        // one truncated (RFC 4106 §6) — for every length around the block
        // and buffer boundaries, both key sizes.
        for keylen in [20usize, 36] {
            let km: Vec<u8> = (0..keylen).map(|i| (i * 29 + 3) as u8).collect();
            let (full, short) = (AesGcm::new(&km, 16).unwrap(), AesGcm::new(&km, 12).unwrap());
            assert_eq!((full.provider(), short.provider()), ("ring", "composition"));
            for len in 0..300 {
                let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let iv = [(len % 251) as u8; 8];
                let aad = [0x11u8, 0x22, 0x33, 0x44, 0, 0, 0, len as u8];
                let (mut a, mut b) = (plain.clone(), plain.clone());
                let (mut ta, mut tb) = ([0u8; 16], [0u8; 12]);
                full.seal(&iv, &aad, &mut a, &mut ta);
                short.seal(&iv, &aad, &mut b, &mut tb);
                assert_eq!(a, b, "ciphertext, length {len}");
                assert_eq!(ta[..12], tb, "tag, length {len}");
                full.open(&iv, &aad, &mut a, &ta).unwrap();
                short.open(&iv, &aad, &mut b, &tb).unwrap();
                assert_eq!(
                    (a.as_slice(), b.as_slice()),
                    (plain.as_slice(), plain.as_slice())
                );
            }
        }
    }

    #[test]
    fn tampering_is_refused_and_leaves_data() {
        let key = [7u8; 36];
        let g = AesGcm::new(&key, 16).unwrap();
        let iv = [1u8; 8];
        let mut d = *b"sixteen octets!!";
        let mut icv = [0u8; 16];
        g.seal(&iv, b"aad-aad-", &mut d, &mut icv);
        let sealed = d;
        // A refused packet never yields plaintext: its payload is left as it
        // was (this composition) or wiped (ring, for 16-octet ICVs).
        let no_plaintext = |d: &[u8; 16]| *d == sealed || *d == [0u8; 16];
        for i in 0..16 {
            let mut bad = icv;
            bad[i] ^= 0x80;
            assert_eq!(g.open(&iv, b"aad-aad-", &mut d, &bad), Err(AuthError));
            assert!(no_plaintext(&d));
            d = sealed;
        }
        assert_eq!(g.open(&iv, b"aad-aad!", &mut d, &icv), Err(AuthError));
        assert!(no_plaintext(&d));
        d = sealed;
        assert_eq!(g.open(&iv, b"aad-aad-", &mut d, &icv[..12]), Err(AuthError));
        assert_eq!(d, sealed);
        g.open(&iv, b"aad-aad-", &mut d, &icv).unwrap();
        assert_eq!(&d, b"sixteen octets!!");
    }

    /// GMAC equals GCM with the whole input as AAD and no plaintext, however
    /// the AAD is split (checked against the one-piece GCM path).
    #[test]
    fn gmac_stream_matches_one_piece_aad() {
        let g = AesGcm::new(&[9u8; 36], 16).unwrap();
        let m = AesGcm::new_gmac(&[9u8; 36], 16).unwrap();
        let iv = [3u8; 8];
        for len in [0usize, 1, 7, 15, 16, 17, 33, 100] {
            let rest: Vec<u8> = (0..len as u8).collect();
            for hi in [None, Some([0, 0, 0, 1])] {
                let mut whole = vec![0xaa, 0xbb, 0xcc, 0xdd];
                if let Some(h) = hi {
                    whole.extend_from_slice(&h);
                }
                whole.extend_from_slice(&rest);
                let mut want = [0u8; 16];
                g.seal(&iv, &whole, &mut [], &mut want);
                let aad = GmacAad {
                    spi: &[0xaa, 0xbb, 0xcc, 0xdd],
                    hi,
                    rest: &rest,
                };
                let mut got = [0u8; 16];
                m.gmac(&iv, &aad, &mut got);
                assert_eq!(got, want, "len {len} esn {}", hi.is_some());
                m.verify_gmac(&iv, &aad, &got).unwrap();
                got[0] ^= 1;
                assert_eq!(m.verify_gmac(&iv, &aad, &got), Err(AuthError));
            }
        }
    }

    #[test]
    fn bad_key_lengths_refused() {
        for n in [0, 16, 19, 21, 32, 35, 37] {
            assert!(AesGcm::new(&vec![0; n], 16).is_err(), "{n}");
        }
        assert!(AesGcm::new(&[0; 20], 10).is_err());
    }
}
