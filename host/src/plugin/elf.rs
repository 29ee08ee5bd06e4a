//! A check of a library file before the dynamic loader maps it.
//!
//! The loader maps a library's loadable segments straight from the file; if the file is shorter than
//! a segment says (a copy still being written, a truncated download), touching that page raises
//! SIGBUS and the whole process dies. Reading the ELF program headers first turns that into an error.

/// Why the file cannot be a whole shared library. `None` when it looks whole (or is not ELF at all:
/// the loader then says so itself, without mapping anything).
pub(super) fn truncated(bytes: &[u8]) -> Option<String> {
    const PT_LOAD: u32 = 1;
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return None;
    }
    // 64-bit little-endian only: the targets this host is built for.
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return None;
    }
    let short = || Some(format!("the file is cut short ({} bytes)", bytes.len()));
    let phoff = read_u64(bytes, 0x20)? as usize;
    let phentsize = read_u16(bytes, 0x36)? as usize;
    let phnum = read_u16(bytes, 0x38)? as usize;
    if phentsize < 56 {
        return short();
    }
    for i in 0..phnum {
        let header = phoff.checked_add(i * phentsize)?;
        let (Some(kind), Some(offset), Some(size)) = (
            read_u32(bytes, header),
            read_u64(bytes, header + 8),
            read_u64(bytes, header + 32),
        ) else {
            return short();
        };
        if kind == PT_LOAD && offset.saturating_add(size) > bytes.len() as u64 {
            return Some(format!(
                "the file is cut short: a segment ends at byte {} of {}",
                offset.saturating_add(size),
                bytes.len()
            ));
        }
    }
    None
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_library_passes_and_a_cut_one_does_not() {
        let whole = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(truncated(&whole), None);
        for len in [64, 4096] {
            let reason = truncated(&whole[..len]).expect("cut short");
            assert!(reason.contains("cut short"), "{reason}");
        }
        assert_eq!(
            truncated(b"not a library"),
            None,
            "the loader reports non-ELF files"
        );
    }
}
