//! Checked little-endian reads from a file image: every offset comes from
//! the file, so every read is bounds-checked with checked arithmetic (an
//! offset near `u64::MAX` is `None`, never a panic or a wrap).

/// `len` bytes at `off`, if they are inside `b`.
pub fn bytes(b: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    b.get(start..end)
}

fn array<const N: usize>(b: &[u8], off: u64) -> Option<[u8; N]> {
    bytes(b, off, N as u64)?.try_into().ok()
}

pub fn u8_at(b: &[u8], off: u64) -> Option<u8> {
    array::<1>(b, off).map(|a| a[0])
}

pub fn u16_at(b: &[u8], off: u64) -> Option<u16> {
    array(b, off).map(u16::from_le_bytes)
}

pub fn u32_at(b: &[u8], off: u64) -> Option<u32> {
    array(b, off).map(u32::from_le_bytes)
}

pub fn u64_at(b: &[u8], off: u64) -> Option<u64> {
    array(b, off).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_bounds() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u16_at(&b, 0), Some(0x0201));
        assert_eq!(u32_at(&b, 1), Some(0x0504_0302));
        assert_eq!(u64_at(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(u64_at(&b, 2), None);
        assert_eq!(u8_at(&b, 9), None);
        assert_eq!(u32_at(&b, u64::MAX - 1), None);
        assert_eq!(bytes(&b, u64::MAX, 2), None);
        assert_eq!(bytes(&b, 8, u64::MAX), None);
        assert_eq!(bytes(&b, 9, 0), Some(&[][..]));
    }
}
