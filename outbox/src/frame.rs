//! One stored batch as bytes: a self-describing, checksummed frame around the batch's
//! zstd-compressed Arrow IPC, and finding intact frames in a damaged file.
//!
//! Every frame names its stream and sequence number and carries a CRC-32 of itself, so
//! when the database file around the frames is damaged (a cut at a random byte, a torn
//! page), [`salvage`] can still find each intact frame by scanning the raw bytes.
//!
//! Layout, little-endian: `WOB1` | stream length u16 | stream (UTF-8) | seq u64 |
//! appended_ms i64 | rows u32 | payload length u32 | CRC-32 of everything from the stream
//! length to the end of the payload, u32 (placed before the payload) | payload.

use std::io::Read;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_ipc::CompressionType;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};

use crate::OutboxError;

const MAGIC: &[u8; 4] = b"WOB1";
/// Magic, stream length, seq, appended_ms, rows, payload length, CRC.
const FIXED: usize = 4 + 2 + 8 + 8 + 4 + 4 + 4;

/// A frame read back: what it says about its batch, and the batch's encoded bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// `pipeline/sink`.
    pub stream: String,
    /// Its place in its stream, from 0.
    pub seq: u64,
    /// When it was stored, ms since the Unix epoch.
    pub appended_ms: i64,
    /// Rows in the batch.
    pub rows: u32,
    /// The batch as zstd-compressed Arrow IPC.
    pub payload: Vec<u8>,
}

/// The Arrow IPC stream of `batch`, zstd-compressed.
pub fn encode_batch(batch: &RecordBatch) -> Result<Vec<u8>, OutboxError> {
    let options = IpcWriteOptions::default()
        .try_with_compression(Some(CompressionType::ZSTD))
        .map_err(|e| OutboxError::Encode(e.to_string()))?;
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new_with_options(&mut out, &batch.schema(), options)
        .map_err(|e| OutboxError::Encode(e.to_string()))?;
    writer
        .write(batch)
        .and_then(|()| writer.finish())
        .map_err(|e| OutboxError::Encode(e.to_string()))?;
    drop(writer);
    Ok(out)
}

/// The batches of an encoded payload, with their schema.
pub fn decode_batches(payload: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>), OutboxError> {
    let reader = StreamReader::try_new(std::io::Cursor::new(payload), None)
        .map_err(|e| OutboxError::Decode(e.to_string()))?;
    let schema: SchemaRef = Arc::clone(&reader.schema());
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OutboxError::Decode(e.to_string()))?;
    Ok((schema, batches))
}

impl Frame {
    /// The frame's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let stream = self.stream.as_bytes();
        let mut out = Vec::with_capacity(FIXED + stream.len() + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(stream.len() as u16).to_le_bytes());
        out.extend_from_slice(stream);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.appended_ms.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[4..]);
        crc.update(&self.payload);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Reads the frame at the start of `bytes`: the frame and its length, or why not.
    pub fn parse(bytes: &[u8]) -> Result<(Frame, usize), &'static str> {
        if bytes.len() < FIXED || &bytes[..4] != MAGIC {
            return Err("no frame starts here");
        }
        let stream_len = usize::from(u16::from_le_bytes([bytes[4], bytes[5]]));
        let header_len = FIXED + stream_len;
        if bytes.len() < header_len {
            return Err("the frame's header is cut off");
        }
        let at = 6 + stream_len;
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
        let seq = u64_at(at);
        let appended_ms = u64_at(at + 8) as i64;
        let rows = u32_at(at + 16);
        let payload_len = u32_at(at + 20) as usize;
        let stored_crc = u32_at(at + 24);
        let end = header_len + payload_len;
        if bytes.len() < end {
            return Err("the frame's batch is cut off");
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes[4..at + 24]);
        crc.update(&bytes[header_len..end]);
        if crc.finalize() != stored_crc {
            return Err("the frame's checksum does not match");
        }
        let stream = std::str::from_utf8(&bytes[6..at])
            .map_err(|_| "the frame's stream name is not UTF-8")?
            .to_owned();
        Ok((
            Frame {
                stream,
                seq,
                appended_ms,
                rows,
                payload: bytes[header_len..end].to_vec(),
            },
            end,
        ))
    }
}

/// What a scan of damaged bytes found.
#[derive(Debug, Default)]
pub struct Salvaged {
    /// Every intact frame, once per (stream, seq), in the order found.
    pub frames: Vec<Frame>,
    /// Frames whose start was found but whose rest was cut off or damaged.
    pub broken_frames: u64,
}

/// Finds every intact frame in `bytes`, whatever surrounds them. A frame found twice
/// (databases keep old copies of pages) is kept once.
pub fn salvage(bytes: &[u8]) -> Salvaged {
    // Reading from memory cannot fail.
    salvage_from(bytes).unwrap_or_default()
}

/// [`salvage`] over a file, read in pieces so a large file is never held whole.
pub fn salvage_file(path: &std::path::Path) -> std::io::Result<Salvaged> {
    salvage_from(std::fs::File::open(path)?)
}

/// The largest frame salvage believes: a length past it is damage, not a batch.
const MAX_FRAME: usize = 1 << 30;

/// Every intact frame in what `file` reads, read in pieces of 8 MiB.
fn salvage_from(mut file: impl Read) -> std::io::Result<Salvaged> {
    const CHUNK: usize = 8 << 20;
    let mut found = Salvaged::default();
    let mut seen = std::collections::HashSet::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut eof = false;
    // Reads up to `want` (at least a piece) more of the file into `buf`, dropping what was
    // scanned; false at the end. `read_to_end` grows `buf` only as bytes arrive, so a
    // damaged header claiming a huge frame costs what the file holds, not what it claims.
    let mut fill = |buf: &mut Vec<u8>, at: &mut usize, want: usize| -> std::io::Result<bool> {
        buf.drain(..*at);
        *at = 0;
        let limit = u64::try_from(want.max(CHUNK)).unwrap_or(u64::MAX);
        let read = file.by_ref().take(limit).read_to_end(buf)?;
        Ok(read > 0)
    };
    loop {
        if !eof && buf.len() - at < FIXED {
            eof = !fill(&mut buf, &mut at, CHUNK)?;
        }
        let Some(offset) = find(&buf[at..], MAGIC) else {
            if eof {
                break;
            }
            // Keep the tail: a magic may straddle the pieces.
            at = buf.len().saturating_sub(MAGIC.len() - 1).max(at);
            eof = !fill(&mut buf, &mut at, CHUNK)?;
            continue;
        };
        let start = at + offset;
        match Frame::parse(&buf[start..]) {
            Ok((frame, len)) => {
                if seen.insert((frame.stream.clone(), frame.seq)) {
                    found.frames.push(frame);
                }
                at = start + len;
            }
            Err(_)
                if !eof
                    && frame_len(&buf[start..])
                        .is_some_and(|len| len > buf.len() - start && len <= MAX_FRAME) =>
            {
                // Cut by the piece, not by damage: read the rest and look again.
                at = start;
                let missing = frame_len(&buf[start..]).unwrap_or(0) - (buf.len() - start);
                eof = !fill(&mut buf, &mut at, missing)?;
            }
            Err(_) => {
                found.broken_frames += 1;
                at = start + 1;
            }
        }
    }
    Ok(found)
}

/// The whole length a frame's header claims, when its header is there.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 6 {
        return None;
    }
    let stream_len = usize::from(u16::from_le_bytes([bytes[4], bytes[5]]));
    let at = 6 + stream_len + 20;
    let payload = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    Some(FIXED + stream_len + payload)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    pub(crate) fn batch(rows: usize, base: f64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("dev-{i}")),
                )),
                Arc::new(Float64Array::from_iter_values(
                    (0..rows).map(|i| base + i as f64),
                )),
            ],
        )
        .unwrap()
    }

    fn frame(seq: u64) -> Frame {
        Frame {
            stream: "plant/hub".into(),
            seq,
            appended_ms: 1_700_000_000_000 + seq as i64,
            rows: 3,
            payload: encode_batch(&batch(3, seq as f64)).unwrap(),
        }
    }

    #[test]
    fn a_frame_reads_back_as_written_and_its_batch_decodes() {
        let original = frame(7);
        let bytes = original.to_bytes();
        let (parsed, len) = Frame::parse(&bytes).unwrap();
        assert_eq!((parsed.clone(), len), (original, bytes.len()));
        let (_, batches) = decode_batches(&parsed.payload).unwrap();
        assert_eq!(batches, vec![batch(3, 7.0)]);
    }

    #[test]
    fn any_damaged_byte_is_caught_by_the_checksum() {
        let bytes = frame(1).to_bytes();
        for i in 4..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert!(
                Frame::parse(&damaged).is_err(),
                "byte {i} flipped unnoticed"
            );
        }
        for cut in 0..bytes.len() {
            assert!(
                Frame::parse(&bytes[..cut]).is_err(),
                "cut at {cut} unnoticed"
            );
        }
    }

    #[test]
    fn salvage_finds_intact_frames_among_noise_and_counts_broken_ones() {
        let mut bytes = b"some page header".to_vec();
        bytes.extend(frame(0).to_bytes());
        bytes.extend([0u8; 100]);
        let second = frame(1).to_bytes();
        bytes.extend(&second[..second.len() - 5]); // cut short
        bytes.extend(frame(2).to_bytes());
        bytes.extend(frame(0).to_bytes()); // an old copy
        let found = salvage(&bytes);
        let seqs: Vec<u64> = found.frames.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [0, 2]);
        assert_eq!(found.broken_frames, 1);
    }

    /// A reader that notes the largest buffer it is asked to fill.
    struct Recording<'a> {
        data: &'a [u8],
        largest_request: usize,
    }

    impl Read for Recording<'_> {
        fn read(&mut self, into: &mut [u8]) -> std::io::Result<usize> {
            self.largest_request = self.largest_request.max(into.len());
            self.data.read(into)
        }
    }

    #[test]
    fn a_header_claiming_a_huge_frame_costs_what_the_file_holds() {
        // A damaged header that claims a frame of almost 1 GiB in a file of a few KiB: the
        // scan must neither reserve nor zero the claimed size (it did, 8 MiB per call at
        // least, which made the fuzzer run at 60 inputs a second).
        let mut bytes = frame(0).to_bytes();
        let mut liar = frame(1).to_bytes();
        let payload_len_at = 4 + 2 + "plant/hub".len() + 20;
        liar[payload_len_at..payload_len_at + 4].copy_from_slice(&(1u32 << 29).to_le_bytes());
        bytes.extend(&liar);
        bytes.extend(frame(2).to_bytes());
        let mut reader = Recording {
            data: &bytes,
            largest_request: 0,
        };
        let found = salvage_from(&mut reader).unwrap();
        let seqs: Vec<u64> = found.frames.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [0, 2]);
        assert_eq!(found.broken_frames, 1);
        assert!(
            reader.largest_request < 1 << 20,
            "asked the reader to fill {} bytes for a {}-byte file",
            reader.largest_request,
            bytes.len()
        );
    }
}
