//! Small helpers for the W1 figures: grouping digits and measuring how much of an
//! executable is actually loaded.
//!
//! Shared by the benchmark and `tests/w1.rs` through `#[path]`, so its unit tests run under
//! `cargo test --test w1` (the harness-less benchmark never runs tests).

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The bytes of an ELF64 little-endian file that are loaded into memory (allocated sections
/// with contents): about what `strip` leaves. Release builds keep line tables for
/// backtraces, which can dwarf the code itself, so the file size alone misleads.
///
/// `None` when the file is not an ELF64 little-endian file or its headers are truncated.
pub fn elf_loadable_bytes(elf: &[u8]) -> Option<u64> {
    const SHF_ALLOC: u64 = 0x2;
    const SHT_NOBITS: u32 = 8;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    // Magic, class 2 (64-bit), data 1 (little-endian).
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let table = usize::try_from(u64_at(0x28)?).ok()?;
    let entry = usize::from(u16_at(0x3A)?);
    let count = usize::from(u16_at(0x3C)?);
    let mut total = 0u64;
    for index in 0..count {
        let header = table.checked_add(index.checked_mul(entry)?)?;
        let kind = u32_at(header + 4)?;
        let flags = u64_at(header + 8)?;
        if flags & SHF_ALLOC != 0 && kind != SHT_NOBITS {
            total += u64_at(header + 0x20)?;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(5_000_000), "5,000,000");
    }

    #[test]
    fn loadable_bytes_reads_this_very_executable() {
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let loadable = elf_loadable_bytes(&me).unwrap();
        assert!(loadable > 0 && loadable <= me.len() as u64);
        assert_eq!(elf_loadable_bytes(b"#!/bin/sh"), None);
        assert_eq!(elf_loadable_bytes(&me[..70]), None);
    }
}
