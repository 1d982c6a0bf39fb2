//! The allocator ([`Alloc`]: mimalloc, with 16-aligned blocks from their
//! size class), and memory it holds for nothing, given back once a control
//! thread is idle.
//!
//! mimalloc keeps the pages a thread has freed for its purge delay (1 s by
//! default) and purges them only when that thread next calls into it. A
//! control thread that applied a batch and then waits for its next request
//! calls into it no more, so it kept what the batch freed: at the carrier
//! edge, the path copies of every earlier version of the tables, about
//! 0.1–0.2 KiB a tunnel of resident memory at 100 000 tunnels
//! (docs/performance.md). Startup leaves the same behind (the XDP object
//! parsed, the configuration's text and its checks).
//!
//! So the threads that build, swap and free the tables (the control
//! connections, the events thread that frees what the workers retired, the
//! metrics page, and the main thread after startup) collect once they have
//! been idle for [`IDLE`] after some work: their free pages go back to the
//! arenas and the arenas' free pages to the system. Only idle threads do it,
//! so a stream of changes pays nothing (mimalloc's own delayed purge runs
//! then, as those threads allocate), and the workers never do.

use std::alloc::{GlobalAlloc, Layout};
use std::time::{Duration, Instant};

/// mimalloc, with every block taken from its own size class.
///
/// The `mimalloc` crate's allocator passes every allocation through
/// `mi_malloc_aligned`, and mimalloc v3 serves that from the size class
/// only when the class is a power of two or a page of the class happens to
/// have a free block; otherwise it over-allocates by the alignment
/// (v3's `mi_malloc_is_naturally_aligned`): 96 octets aligned to 8 took a
/// 112-octet block, 448 a 512, and an SA's 896-octet core (aligned to 16:
/// ring's key schedule sits inline) a 1024 one, 128 octets a tunnel at the
/// carrier edge. Every mimalloc block is 8-aligned, and a class whose size
/// is a multiple of 16 has every block 16-aligned (its page starts so,
/// malloc's own `max_align_t` contract); each block is checked all the
/// same, with the aligned call as the fallback.
pub struct Alloc;

// SAFETY (the impl): every method forwards to mimalloc's matching call
// (what `mimalloc::MiMalloc` does), except that `alloc` and `alloc_zeroed`
// first try the plain call for a layout aligned to 8 or less, or to 16
// with a size that is a multiple of 16, and return its block only if it
// meets the alignment (else free it and take the aligned call). So every
// block returned meets the layout, and `mi_free` frees any block mimalloc
// returned.
unsafe impl GlobalAlloc for Alloc {
    #[inline]
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            take(
                l,
                libmimalloc_sys::mi_malloc,
                libmimalloc_sys::mi_malloc_aligned,
            )
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            take(
                l,
                libmimalloc_sys::mi_zalloc,
                libmimalloc_sys::mi_zalloc_aligned,
            )
        }
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, _l: Layout) {
        // SAFETY: `p` came from one of the calls above (GlobalAlloc's contract).
        unsafe { libmimalloc_sys::mi_free(p.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `p` came from this allocator with layout `l`; mimalloc
        // keeps or moves the block at `l`'s alignment.
        unsafe { libmimalloc_sys::mi_realloc_aligned(p.cast(), new_size, l.align()) as *mut u8 }
    }
}

/// A block for `l` from mimalloc's `plain` call when it meets the
/// alignment, else from its `aligned` one (malloc or zalloc, both ways).
///
/// # Safety
/// As mimalloc's calls: none beyond returning the block to `mi_free`.
#[inline]
unsafe fn take(
    l: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut core::ffi::c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut core::ffi::c_void,
) -> *mut u8 {
    // SAFETY: mimalloc's calls take any size and alignment; a block the
    // plain call gave that misses the alignment is freed once, here.
    unsafe {
        if plain_fits(l) {
            let p = plain(l.size()) as *mut u8;
            if (p as usize).is_multiple_of(l.align()) {
                return p;
            }
            libmimalloc_sys::mi_free(p.cast());
        }
        aligned(l.size(), l.align()) as *mut u8
    }
}

/// A layout the plain call serves at its alignment: aligned to 8 or less,
/// or to 16 with a size that is a multiple of 16.
#[inline]
fn plain_fits(l: Layout) -> bool {
    l.align() <= 8 || (l.align() == 16 && l.size() != 0 && l.size().is_multiple_of(16))
}

/// How long a thread waits after its last work before it gives memory back:
/// mimalloc's own purge delay, so what a busy thread would purge anyway.
pub const IDLE: Duration = Duration::from_secs(1);

/// Gives the calling thread's free pages back to mimalloc's arenas, and the
/// arenas' free pages to the system (mimalloc's `mi_collect(true)`).
pub fn give_back() {
    // SAFETY: `mi_collect` takes no pointers and touches only the calling
    // thread's heap and the arenas' free pages, under mimalloc's own
    // synchronisation; it may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Takes 4 KiB pages for the rest of the process's life: the kernel's
/// transparent huge pages off for it (`PR_SET_THP_DISABLE`, which overrides
/// the `MADV_HUGEPAGE` mimalloc gives its arenas; a huge page already
/// faulted in stays one).
///
/// A first touch of a 2 MiB huge page zeroes all of it in the fault, in
/// the thread that touched it. On this VM (a host that backs guest memory
/// when the guest first touches it) that took 2–5 ms; in a 5 000-SA batch,
/// whose tables grow by about 8 MiB, it was most of the install's spread
/// (docs/performance.md). Small pages spread that cost over the batch's
/// allocations and keep the resident set to what is used.
pub fn small_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("espd: transparent huge pages stay on (PR_SET_THP_DISABLE: {e})");
    }
}

/// One thread's debt: set by work, paid by [`Idle::tick`] once the thread
/// has been idle for the delay.
#[derive(Debug)]
pub struct Idle {
    after: Duration,
    since: Option<Instant>,
}

impl Default for Idle {
    fn default() -> Self {
        Idle::after(IDLE)
    }
}

impl Idle {
    pub fn after(after: Duration) -> Self {
        Idle { after, since: None }
    }

    /// The thread did work that allocated or freed: it owes a collect.
    pub fn worked(&mut self) {
        self.since = Some(Instant::now());
    }

    /// Called while the thread waits: collects if it owes one and has been
    /// idle long enough. True if it collected.
    pub fn tick(&mut self) -> bool {
        if self.since.is_some_and(|t| t.elapsed() >= self.after) {
            self.since = None;
            give_back();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> i64 {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: i64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4
    }

    /// What a thread freed stays resident until it collects, and goes when
    /// it does; a thread that owes nothing or has not been idle long
    /// enough does not collect.
    /// Every block comes from its own size class (mimalloc's aligned call
    /// gave 96 octets aligned to 8 a 112-octet block, an SA's 16-aligned
    /// 896-octet core a 1024 one) and meets its alignment.
    /// `espd` without `--thp`: the process's transparent huge pages are off
    /// (what every later fault of the heap obeys).
    #[test]
    fn small_pages_turn_the_process_huge_pages_off() {
        small_pages();
        assert_eq!(nix::sys::prctl::get_thp_disable(), Ok(true));
    }

    #[test]
    fn blocks_take_their_own_size_class() {
        for (size, align) in [
            (96, 8),
            (448, 8),
            (640, 8),
            (896, 8),
            (896, 16),
            (48, 8),
            (16, 1),
        ] {
            let l = Layout::from_size_align(size, align).unwrap();
            let blocks: Vec<*mut u8> = (0..1000)
                .map(|i| {
                    // SAFETY: a non-zero layout; freed below with it.
                    let p = unsafe {
                        if i % 2 == 0 {
                            Alloc.alloc(l)
                        } else {
                            Alloc.alloc_zeroed(l)
                        }
                    };
                    assert!(!p.is_null() && (p as usize).is_multiple_of(align));
                    // SAFETY: `p` is a live mimalloc block.
                    let usable = unsafe { libmimalloc_sys::mi_usable_size(p.cast()) };
                    assert_eq!(usable, size, "{size} octets aligned to {align}");
                    p
                })
                .collect();
            for p in blocks {
                // SAFETY: allocated above with `l`, freed once.
                unsafe { Alloc.dealloc(p, l) };
            }
        }
        let arc = std::sync::Arc::new(espd_core::state::SaCore::new(sa_cfg()).unwrap());
        let p = std::sync::Arc::as_ptr(&arc) as *const u8;
        // SAFETY: the Arc's block starts two counters before its value.
        let usable = unsafe { libmimalloc_sys::mi_usable_size(p.sub(16).cast()) };
        assert_eq!(usable, 896, "an SA's core and keys, one 896-octet block");
    }

    fn sa_cfg() -> espd_core::state::SaConfig {
        let line = "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x100 reqid 1 \
                    mode tunnel aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128";
        match espd_config::parse_line(line) {
            Ok(Some(espd_config::Item::State(c))) => *c,
            other => panic!("the state line parses: {other:?}"),
        }
    }

    #[test]
    fn an_idle_thread_gives_freed_pages_back() {
        // On a thread of its own: what it allocates and frees is its heap's.
        std::thread::spawn(|| {
            let mut idle = Idle::after(Duration::from_millis(50));
            assert!(!idle.tick(), "owes nothing yet");
            // 64 MiB in small blocks, the size of table nodes, then freed.
            let blocks: Vec<Box<[u8; 96]>> =
                (0..700_000).map(|i| Box::new([i as u8; 96])).collect();
            let full = rss_kib();
            drop(blocks);
            idle.worked();
            assert!(!idle.tick(), "not idle long enough");
            let freed = rss_kib();
            std::thread::sleep(Duration::from_millis(60));
            assert!(idle.tick());
            let after = rss_kib();
            assert!(!idle.tick(), "paid");
            eprintln!("RSS {full} KiB full, {freed} KiB freed, {after} KiB after the collect");
            assert!(
                freed - after > 32 * 1024,
                "the collect gave back {} KiB of 64 MiB freed",
                freed - after
            );
        })
        .join()
        .unwrap();
    }
}
