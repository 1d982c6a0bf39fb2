//! Many entries of a BPF hash map changed in one system call
//! (`BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`, Linux 5.6), which
//! aya 0.14 does not offer: a batch of 5 000 SAs is 5 000 SPIs, and one
//! `bpf(2)` call each cost about 1.2 µs of the install (docs/performance.md).
//! A kernel without them (`EINVAL`, `ENOTSUPP`) gets the elements one at a
//! time, as before.

use aya::maps::{HashMap, Map, MapData};
use std::os::fd::{AsFd, AsRawFd};

/// `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Elements a call takes at most: the kernel goes through them one by one
/// (`generic_map_update_batch`), so a bounded call bounds the time spent in
/// one system call, and a batch's `count` fits its `u32`.
const CHUNK: usize = 4096;

/// One batch call on the map `fd` whose keys are `K` and values `V`, for
/// `keys` (and `values`, as many, for an update): the elements it handled,
/// and the error that stopped it, if one did.
fn call<K: aya::Pod, V: aya::Pod>(
    cmd: libc::c_long,
    fd: u32,
    keys: &[K],
    values: Option<&[V]>,
) -> (usize, i32) {
    let n = keys.len().min(CHUNK);
    if let Some(v) = values {
        assert!(v.len() >= n, "a value for every key");
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: n as u32,
        map_fd: fd,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is the `batch` member of `bpf_attr`, and its size is
    // passed. The kernel reads `n` keys (and values) from the slices, which
    // hold at least `n` and outlive the call, at the map's key and value
    // sizes: `K` and `V`'s, as `fd` (the only maker of `fd`) checked. It
    // writes nothing of ours but `attr.count`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            core::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if r == 0 {
        (n, 0)
    } else {
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        ((attr.count as usize).min(n), e)
    }
}

/// The descriptor of a hash map (checked to be one, with `K` and `V` of its
/// key and value sizes).
fn fd<K: aya::Pod, V: aya::Pod>(map: &mut Map) -> Result<u32, aya::maps::MapError> {
    HashMap::<&mut MapData, K, V>::try_from(&mut *map)?;
    match map {
        Map::HashMap(d) => Ok(d.fd().as_fd().as_raw_fd() as u32),
        _ => unreachable!("a hash map, as try_from checked"),
    }
}

/// Sets `keys[i]` to `values[i]` for every i (`BPF_ANY`) in the hash map
/// `data`, in calls of up to [`CHUNK`]. Where a call stops (the map is
/// full, or the kernel has no batches), the rest go one at a time, so an
/// error is the kernel's for that element, as aya reports it.
pub fn update<K: aya::Pod, V: aya::Pod>(
    data: &mut Map,
    keys: &[K],
    values: &[V],
) -> Result<(), aya::maps::MapError> {
    assert_eq!(keys.len(), values.len(), "a value for every key");
    let fd = fd::<K, V>(data)?;
    let mut at = 0;
    while at < keys.len() {
        let (done, e) = call(BPF_MAP_UPDATE_BATCH, fd, &keys[at..], Some(&values[at..]));
        at += done;
        if e != 0 {
            let mut m = HashMap::<&mut MapData, K, V>::try_from(data)?;
            for (k, v) in keys[at..].iter().zip(&values[at..]) {
                m.insert(*k, *v, 0)?;
            }
            return Ok(());
        }
    }
    Ok(())
}

/// Removes `keys` from the hash map `data`; absent ones are ignored.
pub fn remove<K: aya::Pod, V: aya::Pod>(
    data: &mut Map,
    keys: &[K],
) -> Result<(), aya::maps::MapError> {
    let fd = fd::<K, V>(data)?;
    let mut at = 0;
    while at < keys.len() {
        let (done, e) = call::<K, V>(BPF_MAP_DELETE_BATCH, fd, &keys[at..], None);
        at += done;
        match e {
            0 => {}
            // The call stopped at an absent key: skip it, batch on.
            libc::ENOENT => at += 1,
            // No batches here (or the call failed otherwise): the rest one
            // at a time, absent ones ignored as before.
            _ => {
                let mut m = HashMap::<&mut MapData, K, V>::try_from(&mut *data)?;
                for k in &keys[at..] {
                    let _ = m.remove(k);
                }
                return Ok(());
            }
        }
    }
    Ok(())
}
