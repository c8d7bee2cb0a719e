//! Drops `weir`'s mappings of its start-up code once its pipelines run.
//!
//! Planning a pipeline (parsing and optimising its SQL, building DataFusion's function
//! registry and physical plans) runs a large part of the binary exactly once. Each page it
//! touches stays mapped, with the neighbours the kernel maps around every fault, for as
//! long as the process lives: on the 50 MiB `dist` binary that is 32 MiB of an idle
//! pipeline's 36 MiB. Once the pipelines run, `weir` unmaps the pages of the read-only
//! mappings of its executable and of the shared libraries it loaded (libc, libm…) with
//! `madvise(MADV_DONTNEED)`, and the code the pipelines go on running
//! faults back in from the page cache, so what stays resident is the working set. The
//! pages left unmapped are clean file pages: the kernel reclaims them first when memory
//! runs short, where mapped code is kept longest.
//!
//! Only mappings that hold no private (anonymous or swapped) pages are touched, so nothing
//! the program wrote is lost: the relocated, read-only-after-start data (RELRO) is kept.
//! `--keep-start-up-code` turns this off.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::path::Path;
use std::ptr::NonNull;

use nix::sys::mman::{MmapAdvise, madvise};

/// One read-only, file-backed mapping of code, from `/proc/self/smaps`.
#[derive(Debug, PartialEq, Eq)]
struct CodeMapping {
    start: usize,
    len: NonZeroUsize,
}

/// Unmaps the resident pages of the read-only mappings of this executable and of its
/// shared libraries (their code and constants) that hold nothing but copies of the file.
/// Returns the bytes of mappings advised.
pub fn unmap_own_code() -> std::io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut advised = 0;
    for mapping in code_mappings(&smaps, &exe) {
        let Some(start) = NonNull::new(mapping.start as *mut c_void) else {
            continue;
        };
        // SAFETY: the range is one whole mapping that /proc/self/smaps lists as private,
        // not writable, backed by the executable's or a shared library's file, and holding
        // no anonymous or
        // swapped page: every page in it is the file's content, unmodified. Such a
        // mapping cannot gain private pages without a write, which its protection
        // forbids, and nothing unmaps the executable or its libraries (weir loads none
        // at run time, so none is closed either). MADV_DONTNEED on a
        // private file mapping drops the pages from this process; the next access reads
        // them from the file again, unchanged, so no memory the program can observe
        // changes. A range no longer mapped is an ENOMEM error, not undefined behaviour.
        #[allow(unsafe_code)]
        let outcome = unsafe { madvise(start, mapping.len.get(), MmapAdvise::MADV_DONTNEED) };
        outcome?;
        advised += mapping.len.get() as u64;
    }
    Ok(advised)
}

/// Unmaps the start-up code (see the module's documentation) unless `keep`, and logs how
/// much was advised.
pub async fn release(keep: bool) {
    if keep {
        return;
    }
    match tokio::task::spawn_blocking(unmap_own_code).await {
        Ok(Ok(advised)) => tracing::debug!(
            "unmapped {:.1} MiB of start-up code",
            advised as f64 / (1024.0 * 1024.0)
        ),
        Ok(Err(error)) => {
            tracing::debug!("cannot unmap the start-up code: {error}; it stays resident");
        }
        Err(error) => tracing::debug!("unmapping the start-up code stopped: {error}"),
    }
}

/// The mappings of `smaps` (the text of `/proc/PID/smaps`) that are private, not
/// writable, backed by the file `exe` or a shared library, and hold no anonymous or
/// swapped page.
fn code_mappings(smaps: &str, exe: &Path) -> Vec<CodeMapping> {
    let mut mappings = Vec::new();
    // The mapping being read, while it still qualifies.
    let mut current: Option<CodeMapping> = None;
    for line in smaps.lines() {
        if let Some((field, value)) = line.split_once(':')
            && !field.contains(' ')
        {
            // A field of the current mapping, such as `Anonymous:   0 kB`.
            if matches!(field, "Anonymous" | "Swap") && value.trim() != "0 kB" {
                current = None;
            }
            continue;
        }
        mappings.extend(current.take());
        current = code_mapping(line, exe);
    }
    mappings.extend(current);
    mappings
}

/// The mapping that the header line `line` of `/proc/PID/smaps` describes, when it is a
/// private, not writable mapping of the file `exe` or of a shared library.
fn code_mapping(line: &str, exe: &Path) -> Option<CodeMapping> {
    // START-END PERMS OFFSET DEV INODE PATH (the path may hold spaces).
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let path = fields.nth(3)?.trim_start();
    if perms.len() != 4 || perms[1] == b'w' || perms[3] != b'p' || !is_code(Path::new(path), exe) {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    Some(CodeMapping {
        start,
        len: NonZeroUsize::new(end.checked_sub(start)?)?,
    })
}

/// Whether `path` is the executable `exe` or a shared library (`libc.so.6`,
/// `ld-linux-x86-64.so.2`): files of code, never data the program maps itself.
fn is_code(path: &Path, exe: &Path) -> bool {
    path == exe
        || path.is_absolute()
            && path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with(".so") || name.contains(".so."))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One mapping's header and the fields that matter, as `/proc/PID/smaps` writes them.
    fn smaps_entry(header: &str, anonymous_kb: u64, swap_kb: u64) -> String {
        format!(
            "{header}\nSize:                 64 kB\nRss:                  12 kB\n\
             Anonymous:            {anonymous_kb} kB\nSwap:                 {swap_kb} kB\n\
             THPeligible:    0\nVmFlags: rd mr mw me\n"
        )
    }

    #[test]
    fn only_read_only_mappings_of_code_that_the_program_never_wrote_are_unmapped() {
        let exe = "/opt/weir/bin/weir";
        let smaps = [
            smaps_entry(
                &format!("55d0c0000000-55d0c0100000 r--p 00000000 08:01 42     {exe}"),
                0,
                0,
            ),
            smaps_entry(
                &format!("55d0c0100000-55d0c0800000 r-xp 00100000 08:01 42     {exe}"),
                0,
                0,
            ),
            // RELRO: read-only now, but relocated at start, so it holds private pages.
            smaps_entry(
                &format!("55d0c0800000-55d0c0880000 r--p 00800000 08:01 42     {exe}"),
                24,
                0,
            ),
            // Private pages the kernel swapped out are the program's too.
            smaps_entry(
                &format!("55d0c0880000-55d0c0890000 r--p 00880000 08:01 42     {exe}"),
                0,
                8,
            ),
            smaps_entry(
                &format!("55d0c0890000-55d0c0900000 rw-p 00890000 08:01 42     {exe}"),
                0,
                0,
            ),
            smaps_entry(
                &format!("55d0c0900000-55d0c0a00000 r--p 00900000 08:01 43     {exe} 2"),
                0,
                0,
            ),
            smaps_entry(
                &format!("55d0c0a00000-55d0c0b00000 r--s 00000000 08:01 42     {exe}"),
                0,
                0,
            ),
            smaps_entry(
                "7f0000000000-7f0000100000 r-xp 00000000 08:01 77     /usr/lib/libc.so.6",
                0,
                0,
            ),
            // A data file the program mapped is not code, whatever it holds.
            smaps_entry(
                "7f0000100000-7f0000200000 r--p 00000000 08:01 78     /var/lib/weir/data.arrow",
                0,
                0,
            ),
            smaps_entry("7f0000200000-7f0000300000 r--p 00000000 00:00 0 ", 0, 0),
            smaps_entry(
                "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0      [stack]",
                12,
                0,
            ),
        ]
        .concat();
        assert_eq!(
            code_mappings(&smaps, Path::new(exe)),
            [
                CodeMapping {
                    start: 0x55d0c0000000,
                    len: NonZeroUsize::new(0x100000).unwrap(),
                },
                CodeMapping {
                    start: 0x55d0c0100000,
                    len: NonZeroUsize::new(0x700000).unwrap(),
                },
                CodeMapping {
                    start: 0x7f0000000000,
                    len: NonZeroUsize::new(0x100000).unwrap(),
                },
            ]
        );
        // A path with a space is its own file (beside libc); a line that is no mapping
        // is skipped.
        let smaps = format!("{smaps}garbage line\n");
        let starts: Vec<usize> = code_mappings(&smaps, Path::new("/opt/weir/bin/weir 2"))
            .iter()
            .map(|mapping| mapping.start)
            .collect();
        assert_eq!(starts, [0x55d0c0900000, 0x7f0000000000]);
    }

    #[test]
    fn unmapping_the_code_of_this_test_binary_keeps_it_running() {
        let advised = unmap_own_code().expect("madvise succeeds");
        assert!(advised > 0, "found no code mappings of the test binary");
        // The code that runs next, and the constants it reads, fault back in unchanged.
        let words: Vec<String> = "the quick brown fox"
            .split(' ')
            .map(str::to_uppercase)
            .collect();
        assert_eq!(words.join("-"), "THE-QUICK-BROWN-FOX");
    }
}
