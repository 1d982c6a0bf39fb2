//! Anti-replay (RFC 4303 §3.4.3) with an RFC 6479 ring of 64-bit blocks, and
//! ESN high-bit inference (RFC 4303 Appendix A).
//!
//! Two phases, as boringtun and DPDK do it: [`ReplayWindow::check`] before the
//! ICV is verified (cheap rejection, no state change), [`ReplayWindow::commit`]
//! only after it verified. `commit` checks again, so several packets of one
//! burst may be checked before any is committed.

/// The largest window we accept (packets).
pub const MAX_WINDOW: u32 = 1 << 16;
const BLOCK_BITS: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// Inside the window and already received.
    Replay,
    /// Left of the window: older than the last `size` sequence numbers.
    TooOld,
}

/// A receive window. `size == 0` disables replay checking (RFC 4303 §3.4.3
/// lets the receiver do so); the highest number seen is still tracked.
#[derive(Clone)]
pub struct ReplayWindow {
    size: u32,
    /// Highest authenticated sequence number (all 64 bits), 0 = none yet.
    top: u64,
    /// Ring of blocks; length a power of two, at least size/64 + 1.
    bitmap: Box<[u64]>,
}

impl core::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ReplayWindow {{ size: {}, top: {} }}",
            self.size, self.top
        )
    }
}

impl ReplayWindow {
    /// `size` packets (≤ [`MAX_WINDOW`]), starting as if `top` had been received
    /// (XFRM's `replay-seq`/`replay-seq-hi`).
    pub fn new(size: u32, top: u64) -> Self {
        let size = size.min(MAX_WINDOW);
        let blocks = (size as usize).div_ceil(BLOCK_BITS as usize) + 1;
        ReplayWindow {
            size,
            top,
            bitmap: vec![0u64; blocks.next_power_of_two()].into_boxed_slice(),
        }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// The highest sequence number accepted so far.
    pub fn top(&self) -> u64 {
        self.top
    }

    /// RFC 4303 Appendix A.2: the full 64-bit number for received low bits.
    /// Ties go as Linux `xfrm_replay_seqhi` does.
    pub fn infer_esn(&self, seq_lo: u32) -> u64 {
        let w = self.size.max(1);
        let tl = self.top as u32;
        let th = (self.top >> 32) as u32;
        let bottom = tl.wrapping_sub(w - 1);
        let seq_hi = if tl >= w - 1 {
            // Case A: the window lies within one sequence-number subspace.
            if seq_lo < bottom {
                th.wrapping_add(1)
            } else {
                th
            }
        } else if seq_lo >= bottom {
            // Case B: the window spans two subspaces; this is the lower one.
            th.wrapping_sub(1)
        } else {
            th
        };
        (u64::from(seq_hi) << 32) | u64::from(seq_lo)
    }

    fn locate(&self, seq: u64) -> (usize, u64) {
        let block = (seq / BLOCK_BITS) as usize & (self.bitmap.len() - 1);
        (block, 1u64 << (seq % BLOCK_BITS))
    }

    /// Checks a full 64-bit sequence number without changing the window.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            // RFC 4303 §3.3.3: the first packet has sequence number 1; 0 is never sent.
            return Err(ReplayError::Replay);
        }
        if self.size == 0 || seq > self.top {
            return Ok(());
        }
        if self.top - seq >= u64::from(self.size) {
            return Err(ReplayError::TooOld);
        }
        let (b, bit) = self.locate(seq);
        if self.bitmap[b] & bit != 0 {
            return Err(ReplayError::Replay);
        }
        Ok(())
    }

    /// Marks `seq` received, after its ICV verified. Re-checks first.
    pub fn commit(&mut self, seq: u64) -> Result<(), ReplayError> {
        self.check(seq)?;
        if seq > self.top {
            let old_block = self.top / BLOCK_BITS;
            let new_block = seq / BLOCK_BITS;
            let n = self.bitmap.len() as u64;
            let clear = (new_block - old_block).min(n);
            for i in 1..=clear {
                let b = ((old_block + i) % n) as usize;
                self.bitmap[b] = 0;
            }
            self.top = seq;
        }
        if self.size != 0 {
            let (b, bit) = self.locate(seq);
            self.bitmap[b] |= bit;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplayError::*;

    /// Table-driven, in the spirit of WireGuard's selftest/counter.c: each row
    /// is (sequence number, expected result) applied in order, check + commit.
    fn run(size: u32, start: u64, rows: &[(u64, Result<(), ReplayError>)]) {
        let mut w = ReplayWindow::new(size, start);
        for (i, (seq, want)) in rows.iter().enumerate() {
            let got = w.check(*seq).and_then(|_| w.commit(*seq));
            assert_eq!(got, *want, "row {i}: seq {seq} (window {size})");
        }
    }

    #[test]
    fn window_edges_64() {
        run(
            64,
            0,
            &[
                (0, Err(Replay)),
                (1, Ok(())),
                (1, Err(Replay)),
                (9, Ok(())),
                (8, Ok(())),
                (7, Ok(())),
                (7, Err(Replay)),
                (64, Ok(())),
                (1, Err(Replay)), // 64 - 1 = 63 < 64: still inside, and seen
                (2, Ok(())),      // inside, unseen
                (65, Ok(())),     // top 65: window is 2..=65
                (1, Err(TooOld)),
                (2, Err(Replay)),
                (3, Ok(())),
                (128, Ok(())), // window 65..=128
                (64, Err(TooOld)),
                (65, Err(Replay)),
                (66, Ok(())),
                (1000, Ok(())),     // a jump clears the whole ring
                (937, Ok(())),      // 1000 - 63
                (936, Err(TooOld)), // 1000 - 64
                (999, Ok(())),
                (999, Err(Replay)),
            ],
        );
    }

    #[test]
    fn every_size_edge() {
        for size in [1u32, 32, 63, 64, 65, 128, 1000, 4096, MAX_WINDOW] {
            let top = 100_000u64;
            let mut w = ReplayWindow::new(size, 0);
            w.commit(top).unwrap();
            let edge = top - u64::from(size) + 1; // lowest still-acceptable number
            assert_eq!(w.check(edge), if size == 1 { Err(Replay) } else { Ok(()) });
            assert_eq!(w.check(edge - 1), Err(TooOld), "size {size}");
            assert_eq!(w.check(top), Err(Replay));
            assert_eq!(w.check(top + 1), Ok(()));
            // Fill the whole window in reverse; each is accepted once.
            for s in (edge..top).rev() {
                assert_eq!(w.commit(s), Ok(()), "size {size} seq {s}");
                assert_eq!(w.commit(s), Err(Replay));
            }
            // Sliding by exactly the window size retires everything.
            w.commit(top + u64::from(size)).unwrap();
            assert_eq!(w.check(top), Err(TooOld));
            let want = if size == 1 { Err(Replay) } else { Ok(()) }; // top+1 is the new top
            assert_eq!(w.check(top + 1), want, "size {size}");
        }
    }

    #[test]
    fn disabled_window_accepts_all_but_zero() {
        run(
            0,
            0,
            &[(5, Ok(())), (5, Ok(())), (1, Ok(())), (0, Err(Replay))],
        );
    }

    #[test]
    fn check_does_not_commit() {
        let w = ReplayWindow::new(64, 10);
        assert_eq!(w.check(11), Ok(()));
        assert_eq!(w.check(11), Ok(()));
        assert_eq!(w.top(), 10);
    }

    #[test]
    fn esn_inference_appendix_a() {
        const HI: u64 = 1 << 32;
        // Case A, window inside one subspace: top = 2^32 + 1000, W = 64.
        let w = ReplayWindow::new(64, HI + 1000);
        assert_eq!(w.infer_esn(1001), HI + 1001);
        assert_eq!(w.infer_esn(937), HI + 937); // bottom of window
        assert_eq!(w.infer_esn(936), 2 * HI + 936); // below bottom: next subspace
        assert_eq!(w.infer_esn(5), 2 * HI + 5);
        // Case B, window spans the boundary: top = 2^32 + 10, W = 64.
        let w = ReplayWindow::new(64, HI + 10);
        assert_eq!(w.infer_esn(11), HI + 11);
        assert_eq!(w.infer_esn(u32::MAX), u32::MAX as u64); // previous subspace
        assert_eq!(w.infer_esn(u32::MAX - 52), (u32::MAX - 52) as u64); // bottom
        assert_eq!(w.infer_esn(u32::MAX - 53), HI + (u32::MAX - 53) as u64);
        // Crossing 2^32 in order.
        let mut w = ReplayWindow::new(64, u32::MAX as u64 - 2);
        for lo in [u32::MAX - 1, u32::MAX, 0, 1, 2] {
            let s = w.infer_esn(lo);
            w.commit(s).unwrap();
        }
        assert_eq!(w.top(), HI + 2);
        assert_eq!(w.infer_esn(u32::MAX), u32::MAX as u64);
        assert_eq!(w.check(w.infer_esn(u32::MAX)), Err(Replay));
        assert_eq!(w.check(w.infer_esn(u32::MAX - 10)), Ok(()));
    }
}
