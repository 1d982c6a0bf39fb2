//! A new SA's key schedule leaves no copy on the stack.
//!
//! An SA's core holds ring's AES-GCM key schedule inline (one block; see
//! `espd_core::crypto::gcm::AesGcm`). ring builds it by value and the moves
//! into the core's block leave copies in the frames below the caller;
//! `NewSa::new` overwrites them. This test paints the stack below it,
//! expands a key, and looks for the key and its last round key (FIPS-197
//! Appendix A.1's example key, whose schedule is published) in what the
//! expansion left: it must find them after an expansion that does not
//! scrub (so the test can see a residue at all), and not after `NewSa::new`.
//!
//! x86-64 only: the bytes are read with one `mov` each, in `asm!`, because
//! the stack below a frame is memory Rust calls uninitialised.

#![cfg(target_arch = "x86_64")]

use espd_core::state::{NewSa, SaConfig, SaCore, Sad, Spd};
use std::mem::MaybeUninit;
use std::sync::Arc;

/// How far below this test's frame to paint and look: beyond the depth
/// key expansion uses (about 11 KiB in a release build, 38 in a debug one)
/// and a batch's wipe (`espd_core::state::KeyScope::DEPTH`).
const DEPTH: usize = 256 * 1024;
const PAINT: u8 = 0xa5;

/// FIPS-197 Appendix A.1: the cipher key and the last round key w[40..43].
const KEY: [u8; 16] = [
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c,
];
const LAST_ROUND_KEY: [u8; 16] = [
    0xd0, 0x14, 0xf9, 0xa8, 0xc9, 0xee, 0x25, 0x89, 0xe1, 0x3f, 0x0c, 0xc8, 0xb6, 0x63, 0x0c, 0xa6,
];

#[inline(never)]
fn paint() {
    let mut below = MaybeUninit::<[u8; DEPTH]>::uninit();
    let p = std::hint::black_box(below.as_mut_ptr() as *mut u8);
    for i in 0..DEPTH {
        // SAFETY: `p + i` is inside `below`, a local of DEPTH octets.
        unsafe { p.add(i).write_volatile(PAINT) };
    }
}

/// The octets of the DEPTH-octet frame that a call at this depth gets,
/// as the calls before it left them.
#[inline(never)]
fn look() -> Vec<u8> {
    let mut below = MaybeUninit::<[u8; DEPTH]>::uninit();
    let p = std::hint::black_box(below.as_mut_ptr() as *const u8);
    let mut seen = Vec::with_capacity(DEPTH);
    for i in 0..DEPTH {
        let b: u8;
        // SAFETY: `p + i` is inside `below`, a local of DEPTH octets; the
        // `mov` reads one octet of it, whatever it holds, and writes no memory.
        unsafe {
            std::arch::asm!("mov {b}, byte ptr [{p}]", p = in(reg) p.add(i), b = out(reg_byte) b,
                options(nostack, readonly, preserves_flags));
        }
        seen.push(b);
    }
    seen
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A state line with the example key, for the SPI given.
fn line(spi: u32) -> String {
    let mut keymat = KEY.to_vec();
    keymat.extend([0xca, 0xfe, 0xba, 0xbe]);
    let hex: String = keymat.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi {spi:#x} reqid 1 mode tunnel \
         aead 'rfc4106(gcm(aes))' 0x{hex} 128"
    )
}

fn cfg() -> SaConfig {
    match espd_config::parse_line(&line(0x100)) {
        Ok(Some(espd_config::Item::State(c))) => *c,
        other => panic!("the state line parses: {other:?}"),
    }
}

/// The expansion without the scrub: a core built on the stack, moved into
/// its block.
#[inline(never)]
fn unscrubbed(cfg: SaConfig) -> Arc<SaCore> {
    Arc::new(SaCore::new(cfg).expect("the key builds"))
}

/// Which of the key and its last round key the stack below still holds.
fn residue<T>(build: impl FnOnce(SaConfig) -> T) -> (bool, bool) {
    let cfg = cfg();
    paint();
    let core = std::hint::black_box(build(cfg));
    let seen = look();
    drop(core);
    // `look`'s frame lines up with `paint`'s: the deepest quarter, below
    // what the expansion and the scrub reach, is still paint.
    let deepest = &seen[..DEPTH / 4];
    assert!(
        deepest.iter().filter(|b| **b == PAINT).count() > DEPTH / 8,
        "the paint is still there below the depth expansion uses"
    );
    (contains(&seen, &KEY), contains(&seen, &LAST_ROUND_KEY))
}

#[test]
fn a_new_sa_leaves_no_key_schedule_on_the_stack() {
    let before = residue(unscrubbed);
    assert!(
        before.0 || before.1,
        "an expansion that does not scrub leaves the key or its schedule below \
         (else this test cannot see a residue): {before:?}"
    );
    let after = residue(|c| NewSa::new(c).expect("the key builds").into_shared());
    assert_eq!(
        after,
        (false, false),
        "key, last round key left on the stack"
    );
}

/// A batch (what `espd run` applies for a control request, and the
/// configuration at start) wipes once, for all its SAs, when its
/// `KeyScope` goes: what its lines' expansions left is gone then.
#[test]
fn a_batch_leaves_no_key_schedule_on_the_stack() {
    let batch: String = (0..8).map(|i| line(0x200 + i) + "\n").collect();
    let (sad, spd) = (Sad::default(), Spd::default());
    let after = residue(|_| {
        let (ch, ops) = espd_config::db::apply("batch", &batch, &sad, &spd).expect("it applies");
        assert_eq!(ch.states_added, 8);
        ops
    });
    assert_eq!(
        after,
        (false, false),
        "key, last round key left on the stack by a batch"
    );
    // The same on an error: the batch's last line does not apply, after
    // its first eight built their keys.
    let bad = format!("{batch}{}\n", line(0x200));
    let after =
        residue(|_| espd_config::db::apply("batch", &bad, &sad, &spd).expect_err("a repeat"));
    assert_eq!(after, (false, false), "left by a batch that failed");
}

/// A large batch's lines are parsed and their keys expanded on a helper
/// thread (`espd_config::db::parse_chunks`), whose stack the C library
/// keeps for the next thread: it wipes its own when it ends. Run here, on
/// this thread, so that what it leaves can be seen.
#[test]
fn a_batch_parsed_ahead_leaves_no_key_schedule_on_the_stack() {
    let batch: String = (0..200).map(|i| line(0x400 + i) + "\n").collect();
    assert!(batch.len() >= espd_config::db::PARALLEL_MIN, "parsed ahead");
    let (sad, spd) = (Sad::default(), Spd::default());
    let after = residue(|_| {
        let mut chunks = Vec::new();
        espd_config::db::parse_chunks(&batch, &sad, &spd, |c| {
            chunks.push(c);
            true
        });
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 200);
        chunks
    });
    assert_eq!(
        after,
        (false, false),
        "key, last round key left on the stack by the parse"
    );
}
