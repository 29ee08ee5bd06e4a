//! The binary's memory allocator: jemalloc, not glibc's.
//!
//! Measured on the Redis consume path (100,000 entries, `scripts/bench`): glibc's `malloc` and `free`
//! took a fifth of the host's CPU (perf), and jemalloc cut the CPU per message by about a fifth.
//! The binary chooses, not the library, so embedders keep their own allocator; plugins keep theirs
//! too (what crosses the ABI is freed by the side that allocated it).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start.
#[repr(transparent)]
struct Options(*const std::ffi::c_char);

// SAFETY: the pointer is to a static string that is never written.
#[allow(unsafe_code)]
unsafe impl Sync for Options {}

/// - `oversize_threshold`: allocations of 768 KiB and more come from an arena that gives freed memory
///   back at once, as glibc does for its large blocks: cached, the copies of one large message (the
///   read buffer, the entry, the decoded message) added up to 4.6 times its size in peak memory,
///   against 3.1 with glibc (`protean-bench --only limits`). At 1 MiB, the copies of a message of a
///   million bytes fell on either side of the threshold, and publishing one peaked at 3.2–4.5 times
///   its size from run to run; at 768 KiB, 3.2–3.5 in three runs. Smaller allocations, the
///   per-message path, stay cached: at 512 KiB an outbox round's buffers (500 events) were given back
///   too, and publishing measured 6–7% slower in four alternating pairs.
/// - `background_thread`: unused memory is given back to the system by a thread of jemalloc's own
///   instead of inside whichever call to `malloc` or `free` finds it due. Those returns (`madvise`,
///   with its TLB shootdowns on a VM) stalled a message now and then: p99 commit → handled fell from
///   a median of 6.3 to 5.4 ms on SQLite + Redis and from 8.1 to 6.8 ms on PostgreSQL + Redis (five
///   alternating pairs of `protean-bench --only latency`).
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
static OPTIONS: Options = Options(c"oversize_threshold:786432,background_thread:true".as_ptr());
