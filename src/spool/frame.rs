//! The on-disk record frame, shared by queue segments and the state log.
//!
//! ```text
//! 0      4      8      12     13         21
//! | magic | len  | crc  | kind | seq (LE) | payload ...
//!   u32     u32    u32    u8     u64
//! ```
//! `len` counts `kind + seq + payload`; `crc` is CRC-32 (IEEE) of those same bytes. The magic
//! lets recovery find the next frame after a damaged one: it scans forward for the magic and
//! accepts a candidate only if its length is sane and its CRC matches.

/// Marks the start of a frame ("VTG1").
pub const MAGIC: u32 = 0x3147_5456;
/// Bytes before the body.
pub const HEADER: usize = 12;
/// Bytes of `kind + seq`.
pub const BODY_PREFIX: usize = 9;
/// Largest body recovery believes; anything larger is damage.
pub const MAX_BODY: usize = 64 << 20;

/// Frame kinds.
pub mod kind {
    /// A queued event (payload: the event's JSON).
    pub const EVENT: u8 = 1;
    /// State: set a key (payload: u16 key length, key, value).
    pub const PUT: u8 = 2;
    /// State: delete a key (payload: the key).
    pub const DELETE: u8 = 3;
}

/// Appends one frame to `out`; returns its total length.
pub fn encode(out: &mut Vec<u8>, kind: u8, seq: u64, payload: &[u8]) -> usize {
    let body_len = BODY_PREFIX + payload.len();
    let start = out.len();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// The encoded length of a frame with this payload length.
pub fn frame_len(payload_len: usize) -> usize {
    HEADER + BODY_PREFIX + payload_len
}

/// A frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Kind.
    pub kind: u8,
    /// Sequence number.
    pub seq: u64,
    /// Payload.
    pub payload: &'a [u8],
    /// Total encoded length.
    pub len: usize,
}

/// What is at an offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A valid frame.
    Frame(Frame<'a>),
    /// The buffer ends inside a frame (or before a header): a torn tail, or read more.
    Incomplete,
    /// Not a valid frame here.
    Damaged,
}

/// Parses the frame at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    if buf.len() < HEADER {
        return Parsed::Incomplete;
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    if word(0) != MAGIC {
        return Parsed::Damaged;
    }
    let len = word(4) as usize;
    if !(BODY_PREFIX..=MAX_BODY).contains(&len) {
        return Parsed::Damaged;
    }
    let Some(body) = buf.get(HEADER..HEADER + len) else {
        return Parsed::Incomplete;
    };
    if crc32fast::hash(body) != word(8) {
        return Parsed::Damaged;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&body[1..9]);
    Parsed::Frame(Frame {
        kind: body[0],
        seq: u64::from_le_bytes(seq),
        payload: &body[BODY_PREFIX..],
        len: HEADER + len,
    })
}

/// The offset of the next valid frame strictly after `from`, if any.
pub fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    let mut i = from + 1;
    while i + HEADER <= buf.len() {
        match buf[i..].windows(4).position(|w| w == magic) {
            None => return None,
            Some(p) => {
                i += p;
                if let Parsed::Frame(_) = parse(&buf[i..]) {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// What a scan of a whole file found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    /// `(offset, kind, seq, total len)` of every valid frame, in file order.
    pub frames: Vec<(u64, u8, u64, u32)>,
    /// Damaged regions skipped between valid frames (each counted once).
    pub corrupt: u64,
    /// Where the valid data ends: after the last valid frame.
    pub valid_len: u64,
    /// Bytes after `valid_len` that hold no valid frame (a torn or damaged tail).
    pub tail_garbage: u64,
}

/// Scans a file's bytes, skipping damaged regions.
pub fn scan(buf: &[u8]) -> Scan {
    let mut s = Scan::default();
    let mut pos = 0usize;
    while pos < buf.len() {
        match parse(&buf[pos..]) {
            Parsed::Frame(f) => {
                s.frames.push((pos as u64, f.kind, f.seq, f.len as u32));
                pos += f.len;
                s.valid_len = pos as u64;
            }
            Parsed::Incomplete | Parsed::Damaged => match resync(buf, pos) {
                Some(next) => {
                    s.corrupt += 1;
                    pos = next;
                }
                None => break,
            },
        }
    }
    s.tail_garbage = buf.len() as u64 - s.valid_len;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut b = Vec::new();
        let n = encode(&mut b, kind::EVENT, 42, b"hello");
        assert_eq!(n, frame_len(5));
        match parse(&b) {
            Parsed::Frame(f) => {
                assert_eq!(
                    (f.kind, f.seq, f.payload, f.len),
                    (kind::EVENT, 42, &b"hello"[..], n)
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn torn_tail_and_flipped_byte() {
        let mut b = Vec::new();
        for i in 0..5u64 {
            encode(&mut b, kind::EVENT, i, format!("record-{i}").as_bytes());
        }
        let one = frame_len(8);
        // Torn: the last frame loses its last 3 bytes.
        let torn = &b[..b.len() - 3];
        let s = scan(torn);
        assert_eq!(s.frames.len(), 4);
        assert_eq!(s.valid_len as usize, 4 * one);
        assert_eq!(s.tail_garbage as usize, one - 3);
        assert_eq!(s.corrupt, 0);
        // A flipped byte in the middle frame: it is skipped and counted, the rest survive.
        let mut flipped = b.clone();
        flipped[2 * one + 15] ^= 0x40;
        let s = scan(&flipped);
        let seqs: Vec<u64> = s.frames.iter().map(|f| f.2).collect();
        assert_eq!(seqs, vec![0, 1, 3, 4]);
        assert_eq!(s.corrupt, 1);
        assert_eq!(s.tail_garbage, 0);
        // A damaged length field is resynchronized by the magic too.
        let mut bad_len = b.clone();
        bad_len[one + 5] = 0xff;
        let s = scan(&bad_len);
        assert_eq!(
            s.frames.iter().map(|f| f.2).collect::<Vec<_>>(),
            vec![0, 2, 3, 4]
        );
        // Garbage only.
        assert_eq!(scan(&[0xAB; 100]).frames.len(), 0);
        assert_eq!(scan(&[]).valid_len, 0);
    }
}
