//! [`AlignedBuf`]: an owned, heap-allocated byte buffer whose start and capacity are aligned for
//! O_DIRECT. It moves into an I/O operation and comes back with the result (the tokio-uring
//! ownership model), so the kernel never sees a buffer that Rust code could touch meanwhile.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment used when the caller has no stronger requirement: the largest logical block size
/// of the devices we serve, so a buffer from anywhere is valid for any of them.
pub const DEFAULT_ALIGN: usize = 4096;

/// An owned byte buffer aligned for direct I/O.
///
/// Invariants: `ptr` is valid for `cap` bytes and aligned to `align` (a power of two);
/// `len <= cap`; `cap` is a non-zero multiple of `align`; all `cap` bytes are initialised
/// (the allocation is zeroed), so exposing any prefix as `&[u8]` is sound.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    align: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Vec<u8>); no aliasing pointers exist,
// so moving it to another thread (the sync engine's worker pool) is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give read access to initialised bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (rounded up to a power of two, at least 512).
    pub fn new(len: usize, align: usize) -> Self {
        let align = align.max(512).next_power_of_two();
        let cap = len.max(1).div_ceil(align) * align;
        let ptr = alloc_zeroed_buf(cap, align);
        Self {
            ptr,
            len,
            cap,
            align,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8], align: usize) -> Self {
        let mut buf = Self::new(data.len(), align);
        buf.copy_from_slice(data);
        buf
    }

    /// Number of bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes available without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The alignment of the start of the buffer.
    pub fn align(&self) -> usize {
        self.align
    }

    /// Sets the number of bytes in use. Panics if `len` exceeds the capacity (a programming error).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "AlignedBuf::set_len({len}) beyond capacity {}",
            self.cap
        );
        self.len = len;
    }
}

impl AlignedBuf {
    /// A buffer of `len` bytes whose contents are unspecified (but initialised): for data that
    /// will be overwritten entirely, such as a read target or a request payload. Reuses a buffer
    /// of the same capacity freed earlier, avoiding a fresh zeroed allocation (for 1 MiB
    /// requests: a 1 MiB memset, or an mmap, 256 page faults and a munmap each time). The pool
    /// is process-wide: a write's buffer is often freed on the replication writer's thread.
    pub fn for_overwrite(len: usize, align: usize) -> Self {
        let align = align.max(512).next_power_of_two();
        let cap = len.max(1).div_ceil(align) * align;
        let reused = POOL.lock().ok().and_then(|mut p| p.take(cap, align));
        match reused {
            Some(ptr) => Self {
                ptr,
                len,
                cap,
                align,
            },
            None => Self::new(len, align),
        }
    }
}

/// Buffers of at least this capacity get a mapping of their own, aligned to [`HUGE_PAGE`] and
/// advised for transparent huge pages (`MADV_HUGEPAGE`; Debian's default THP mode,
/// `madvise`, gives huge pages only to such mappings). Such a buffer is then physically
/// contiguous, so a 1 MiB direct write reaches the device as one request. From scattered
/// 4 KiB pages it needs 256 segments, more than a virtio disk takes (254 here), and the block
/// layer splits it: measured (docs/BENCHMARKS.md), no-peer 1 MiB writes ran at
/// 892-940 MiB/s split and 1,460-1,551 MiB/s whole on the same disk.
const HUGE_MIN: usize = 1 << 20;
/// Size and alignment of a transparent huge page on x86-64 and (4 KiB granule) arm64.
const HUGE_PAGE: usize = 2 << 20;

/// Whether a buffer of this capacity and alignment lives in a mapping of its own.
fn is_huge(cap: usize, align: usize) -> bool {
    cap >= HUGE_MIN && align <= HUGE_PAGE
}

/// Length of the mapping of a buffer of `cap` bytes ([`is_huge`]).
fn huge_map_len(cap: usize) -> usize {
    cap.div_ceil(HUGE_PAGE) * HUGE_PAGE
}

/// `cap` zeroed bytes aligned to `align` (see [`HUGE_MIN`] for large buffers). Aborts via
/// `handle_alloc_error` when memory is exhausted, as `Vec` does.
fn alloc_zeroed_buf(cap: usize, align: usize) -> NonNull<u8> {
    let layout = Layout::from_size_align(cap, align).expect("aligned buffer layout: size overflow");
    if is_huge(cap, align) {
        return map_huge(huge_map_len(cap))
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
    }
    // SAFETY: layout has a non-zero size (cap >= align >= 512).
    let raw = unsafe { alloc_zeroed(layout) };
    NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
}

/// An anonymous mapping of `len` bytes (a multiple of [`HUGE_PAGE`]) at a [`HUGE_PAGE`]
/// boundary, advised for huge pages; zero-filled by the kernel. None if mmap fails.
fn map_huge(len: usize) -> Option<NonNull<u8>> {
    let over = len + HUGE_PAGE;
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let (head, tail) = (aligned - start, start + over - (aligned + len));
    // SAFETY: both trimmed ranges lie inside the mapping made above, outside
    // [aligned, aligned + len), and nothing refers to them; their lengths are multiples of
    // the page size (start and aligned are page-aligned, over - len = HUGE_PAGE).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Advice only: without huge pages the buffer works the same (its writes may split).
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8)
}

/// Frees what [`alloc_zeroed_buf`] returned.
///
/// # Safety
/// `ptr` must come from `alloc_zeroed_buf(cap, align)` with these `cap` and `align`, and
/// nothing may use it afterwards.
unsafe fn free_buf(ptr: NonNull<u8>, cap: usize, align: usize) {
    if is_huge(cap, align) {
        // SAFETY: (caller's contract) the whole mapping map_huge made for this capacity.
        unsafe { libc::munmap(ptr.as_ptr() as *mut libc::c_void, huge_map_len(cap)) };
    } else {
        // SAFETY: (caller's contract) allocated by the global allocator with this layout.
        unsafe { dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(cap, align)) }
    }
}

/// Buffers up to this capacity are kept for reuse when dropped.
const POOL_MAX_BUF: usize = 4 * 1024 * 1024;
/// Memory a freed buffer of this capacity holds: its whole mapping for a huge one.
fn held_bytes(cap: usize, align: usize) -> usize {
    if is_huge(cap, align) {
        huge_map_len(cap)
    } else {
        cap
    }
}

/// Bytes the pool keeps for reuse at most (bounds the memory it holds, mappings counted whole).
const POOL_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Freed buffers for reuse, shared by every thread (one short lock per allocation and free).
static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

/// (capacity, alignment) of pooled buffers.
type SizeClass = (usize, usize);

/// Freed buffers, by (capacity, alignment) (a handful of size classes: a linear search).
///
/// Invariant: every pointer was allocated by `alloc_zeroed_buf(cap, align)`, is
/// owned by the pool alone, and all its `cap` bytes are initialised; `bytes` is the memory
/// they hold ([`held_bytes`]).
struct Pool {
    free: Vec<(SizeClass, Vec<NonNull<u8>>)>,
    bytes: usize,
}

// SAFETY: the pool owns the allocations its pointers name (like a Vec<Box<[u8]>>); nothing
// else aliases them, and all access goes through the mutex.
unsafe impl Send for Pool {}

impl Pool {
    fn take(&mut self, cap: usize, align: usize) -> Option<NonNull<u8>> {
        let (_, list) = self.free.iter_mut().find(|(k, _)| *k == (cap, align))?;
        let ptr = list.pop()?;
        self.bytes -= held_bytes(cap, align);
        Some(ptr)
    }

    /// Keeps the buffer if there is room; false means the caller must free it.
    fn put(&mut self, ptr: NonNull<u8>, cap: usize, align: usize) -> bool {
        let held = held_bytes(cap, align);
        if cap > POOL_MAX_BUF || self.bytes + held > POOL_MAX_BYTES {
            return false;
        }
        match self.free.iter_mut().find(|(k, _)| *k == (cap, align)) {
            Some((_, list)) => list.push(ptr),
            None => self.free.push(((cap, align), vec![ptr])),
        }
        self.bytes += held;
        true
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let (ptr, cap, align) = (self.ptr, self.cap, self.align);
        let kept = POOL
            .lock()
            .map(|mut p| p.put(ptr, cap, align))
            .unwrap_or(false);
        if !kept {
            // SAFETY: ptr was allocated by `alloc_zeroed_buf(cap, align)` (in `new`), is owned
            // by this buffer alone, and the pool did not take it.
            unsafe { free_buf(ptr, cap, align) }
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid and initialised for cap >= len bytes (struct invariant).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees unique access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AlignedBuf {
    /// The buffer as shared, immutable [`bytes::Bytes`] without a copy: clones and slices
    /// point into this allocation (so a slice starting at a multiple of the alignment is
    /// itself aligned for direct I/O); it is freed (or pooled) when the last one is dropped.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("align", &self.align)
            .finish()
    }
}

// SAFETY: the pointer stays valid and fixed while the buffer is owned by an operation (the buffer
// is moved, the heap allocation is not); bytes_init (len) <= bytes_total (cap).
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
    fn bytes_total(&self) -> usize {
        self.cap
    }
}

// SAFETY: as above; every byte up to cap is initialised (zeroed allocation), so moving len
// forward after the kernel filled the buffer never exposes uninitialised memory.
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        if pos > self.len {
            self.len = pos.min(self.cap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_sized() {
        for (len, align) in [
            (0, 512),
            (1, 512),
            (4096, 4096),
            (5000, 4096),
            (1 << 20, 512),
        ] {
            let b = AlignedBuf::new(len, align);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert_eq!(b.capacity() % align, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn large_buffers_get_a_huge_page_aligned_mapping_of_their_own() {
        for len in [1 << 20, (1 << 20) + 4096, 3 << 20] {
            let mut b = AlignedBuf::new(len, 4096);
            assert!(is_huge(b.capacity(), b.align()));
            assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0, "{len}");
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0xa5);
            assert!(b.iter().all(|&x| x == 0xa5));
        }
        // Smaller ones, or alignments beyond a huge page, come from the allocator.
        assert!(!is_huge((1 << 20) - 4096, 4096));
        assert!(!is_huge(4 << 20, 4 << 20));
        let b = AlignedBuf::new(4 << 20, 4 << 20);
        assert_eq!(b.as_ptr() as usize % (4 << 20), 0);
    }

    #[test]
    fn into_bytes_shares_the_aligned_allocation_and_returns_it_to_the_pool() {
        // A size no other test uses: the pool is shared by the test threads.
        const N: usize = (1 << 16) + 11 * 4096;
        let mut a = AlignedBuf::for_overwrite(N, 4096);
        a.fill(7);
        let p = a.as_ptr();
        let b = a.into_bytes();
        assert_eq!(b.as_ptr(), p);
        assert_eq!(b.len(), N);
        let tail = b.slice(4096..);
        drop(b);
        assert!(tail.iter().all(|&x| x == 7));
        assert_eq!(tail.as_ptr() as usize % 4096, 0);
        // The last holder frees it on another thread (the replication writer does).
        std::thread::spawn(move || drop(tail)).join().unwrap();
        assert_eq!(AlignedBuf::for_overwrite(N, 4096).as_ptr(), p);
    }

    #[test]
    fn buffers_for_overwrite_are_reused_with_their_capacity_and_alignment() {
        // A size no other test uses: the pool is shared by the test threads.
        const N: usize = (1 << 20) + 7 * 4096;
        let a = AlignedBuf::for_overwrite(N, 4096);
        let p = a.as_ptr();
        drop(a);
        let b = AlignedBuf::for_overwrite(N, 4096);
        assert_eq!(b.as_ptr(), p, "the freed buffer is reused");
        assert_eq!((b.len(), b.capacity(), b.align()), (N, N, 4096));
        let c = AlignedBuf::for_overwrite(N, 512);
        assert_ne!(c.as_ptr(), b.as_ptr());
        // Zeroed buffers stay zeroed even when dirty ones are in the pool.
        let mut d = AlignedBuf::for_overwrite(8192, 4096);
        d.fill(0xaa);
        drop(d);
        assert!(AlignedBuf::new(8192, 4096).iter().all(|&x| x == 0));
    }

    #[test]
    fn from_slice_copies() {
        let b = AlignedBuf::from_slice(b"hello", 4096);
        assert_eq!(&b[..], b"hello");
    }
}
