//! A caller-owned packet buffer with headroom and tailroom, so that headers can
//! be prepended and trailers appended in place (an AF_XDP UMEM frame later).

/// `buf[start..end]` is the packet; the rest is free space on either side.
#[derive(Debug)]
pub struct PacketBuf<'a> {
    buf: &'a mut [u8],
    start: usize,
    end: usize,
}

/// Not enough head- or tailroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom;

impl<'a> PacketBuf<'a> {
    /// The packet is `buf[start..start + len]`. Panics only on a caller bug
    /// (a range outside `buf`), never on packet contents.
    pub fn new(buf: &'a mut [u8], start: usize, len: usize) -> Self {
        assert!(start + len <= buf.len(), "packet range outside its buffer");
        PacketBuf {
            buf,
            start,
            end: start + len,
        }
    }
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    /// Offset of the packet in the underlying buffer.
    pub fn start(&self) -> usize {
        self.start
    }
    pub fn headroom(&self) -> usize {
        self.start
    }
    pub fn tailroom(&self) -> usize {
        self.buf.len() - self.end
    }
    /// Grows the packet by `n` octets at the front (contents unspecified).
    pub fn prepend(&mut self, n: usize) -> Result<(), NoRoom> {
        if n > self.start {
            return Err(NoRoom);
        }
        self.start -= n;
        Ok(())
    }
    /// Grows the packet by `n` octets at the end (contents unspecified).
    pub fn append(&mut self, n: usize) -> Result<(), NoRoom> {
        if n > self.tailroom() {
            return Err(NoRoom);
        }
        self.end += n;
        Ok(())
    }
    /// Drops `n` octets from the front (at most the whole packet).
    pub fn trim_front(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }
    /// Keeps at most `len` octets.
    pub fn truncate(&mut self, len: usize) {
        self.end = self.end.min(self.start + len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_enforced() {
        let mut b = [0u8; 16];
        let mut p = PacketBuf::new(&mut b, 4, 8);
        assert_eq!(p.prepend(5), Err(NoRoom));
        assert_eq!(p.append(5), Err(NoRoom));
        p.prepend(4).unwrap();
        p.append(4).unwrap();
        assert_eq!(p.len(), 16);
        p.trim_front(20);
        assert!(p.is_empty());
    }
}
