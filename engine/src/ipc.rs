//! Arrow IPC streams from untrusted peers, decoded only within declared limits.
//!
//! An IPC stream describes its own size: every message declares its body length, every
//! record batch its row count, and every compressed buffer the length it decompresses to.
//! Arrow's reader trusts those numbers and allocates them up front, so a few hundred bytes
//! that claim a terabyte abort the process. [`decode_within`] walks the stream's framing
//! and metadata first, without touching a body, and refuses a stream whose declared sizes,
//! rows, columns or codec exceed [`IpcLimits`]. Only then does Arrow decode it.
//!
//! The hub uses this for device batches, the module runtime for module answers and source
//! pushes: anything that crosses a trust boundary as IPC.

use std::io::Cursor;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::{CompressionType, Field, MessageHeader};
use bytesize::ByteSize;

/// The marker that opens each message of the current IPC framing.
const CONTINUATION: [u8; 4] = [0xFF; 4];
/// What a compressed buffer's length prefix says when the buffer is stored uncompressed.
const STORED_UNCOMPRESSED: i64 = -1;
/// The length prefix of each compressed buffer.
const COMPRESSED_PREFIX: usize = 8;

/// What an untrusted stream may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcLimits {
    /// Rows over all record batches of the stream.
    pub max_rows: u64,
    /// Fields of the schema, nested ones included.
    pub max_columns: usize,
    /// Bytes the stream's buffers take once decompressed, over the whole stream.
    pub max_decoded_bytes: u64,
    /// Whether zstd-compressed buffers are accepted. LZ4 never is: its frames do not
    /// bound their output, and no Weir writer uses it.
    pub allow_zstd: bool,
    /// Whether the stream must end with the end-of-stream marker. A stream cut off
    /// between two batches otherwise looks complete.
    pub require_end_marker: bool,
}

impl IpcLimits {
    /// Limits that refuse nothing a well-behaved peer of this size sends: for tests and
    /// for callers that choose only some limits.
    pub const fn generous() -> Self {
        Self {
            max_rows: u64::MAX,
            max_columns: usize::MAX,
            max_decoded_bytes: u64::MAX,
            allow_zstd: true,
            require_end_marker: false,
        }
    }
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// The framing or metadata is not Arrow IPC, or the bytes end inside a message.
    #[error("not a valid Arrow IPC stream: {0}")]
    Malformed(String),
    /// The bytes end between messages without the end-of-stream marker.
    #[error(
        "the Arrow IPC stream is cut off: it ends after {messages} message(s) without the end-of-stream marker"
    )]
    CutOff {
        /// Messages read before the bytes ran out.
        messages: usize,
    },
    /// The stream declares more rows than allowed.
    #[error("the batch declares {declared} rows, more than the {limit} allowed")]
    TooManyRows {
        /// Rows declared so far.
        declared: u64,
        /// The limit.
        limit: u64,
    },
    /// The schema has more fields than allowed.
    #[error(
        "the schema has {declared} columns (nested fields included), more than the {limit} allowed"
    )]
    TooManyColumns {
        /// Fields declared.
        declared: usize,
        /// The limit.
        limit: usize,
    },
    /// The buffers would take more memory than allowed once decoded.
    #[error("the batch would take {} once decoded, more than the {} allowed", ByteSize(*.declared), ByteSize(*.limit))]
    TooLarge {
        /// Decoded bytes declared so far.
        declared: u64,
        /// The limit.
        limit: u64,
    },
    /// The buffers use a codec that is not accepted.
    #[error(
        "the batch is compressed with {0}, which is not accepted (send it uncompressed or with zstd)"
    )]
    Codec(&'static str),
    /// The stream is well-formed but Arrow cannot decode it.
    #[error("the Arrow IPC stream does not decode: {0}")]
    Decode(String),
}

impl IpcError {
    /// Whether the stream was refused for its size rather than for being broken: the
    /// distinction between a 413 and a 400 for an HTTP peer.
    pub fn is_over_limit(&self) -> bool {
        matches!(
            self,
            Self::TooManyRows { .. } | Self::TooManyColumns { .. } | Self::TooLarge { .. }
        )
    }
}

/// Decodes `bytes` as one Arrow IPC stream after checking what it declares against
/// `limits`. Gives the schema (`None` for an empty input when no end marker is required)
/// and the batches.
pub fn decode_within(
    bytes: &[u8],
    limits: &IpcLimits,
) -> Result<(Option<SchemaRef>, Vec<RecordBatch>), IpcError> {
    let ended = check_declared_sizes(bytes, limits)?;
    if ended.is_none() {
        return Ok((None, Vec::new()));
    }
    // Arrow's reader panics on some malformed buffers (a validity bitmap shorter than
    // its rows) instead of answering an error: the panic is that error here, so a
    // peer's bad bytes never take the task that reads them down.
    let decoded = std::panic::catch_unwind(|| {
        let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
        let schema = reader.schema();
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        Ok::<_, arrow::error::ArrowError>((schema, batches))
    });
    match decoded {
        Ok(Ok((schema, batches))) => Ok((Some(schema), batches)),
        Ok(Err(e)) => Err(IpcError::Decode(e.to_string())),
        Err(panic) => Err(IpcError::Decode(format!(
            "its buffers do not fit its rows ({})",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("arrow refused it")
        ))),
    }
}

/// Walks every message's framing and metadata. Gives `None` for empty input that may be
/// empty, `Some(())` for a stream whose declarations are all within `limits`.
fn check_declared_sizes(bytes: &[u8], limits: &IpcLimits) -> Result<Option<()>, IpcError> {
    let mut at = 0usize;
    let mut messages = 0usize;
    let mut rows = 0u64;
    let mut decoded = 0u64;
    loop {
        if at == bytes.len() {
            if limits.require_end_marker {
                return Err(IpcError::CutOff { messages });
            }
            return Ok((messages > 0).then_some(()));
        }
        let metadata_len = read_metadata_len(bytes, &mut at)?;
        if metadata_len == 0 {
            return Ok(Some(()));
        }
        let metadata = take(bytes, &mut at, metadata_len, "message metadata")?;
        let message = arrow::ipc::root_as_message(metadata)
            .map_err(|e| IpcError::Malformed(format!("message {}: {e}", messages + 1)))?;
        let body_len = usize::try_from(message.bodyLength()).map_err(|_| {
            IpcError::Malformed(format!(
                "message {} declares a negative body length",
                messages + 1
            ))
        })?;
        let body = take(bytes, &mut at, body_len, "message body")?;
        match message.header_type() {
            MessageHeader::Schema => {
                let schema = message
                    .header_as_schema()
                    .ok_or_else(|| IpcError::Malformed("schema message without a schema".into()))?;
                let columns = schema
                    .fields()
                    .map_or(0, |fields| count_fields(fields.iter()));
                if columns > limits.max_columns {
                    return Err(IpcError::TooManyColumns {
                        declared: columns,
                        limit: limits.max_columns,
                    });
                }
            }
            MessageHeader::RecordBatch => {
                let batch = message.header_as_record_batch().ok_or_else(|| {
                    IpcError::Malformed("record batch message without a batch".into())
                })?;
                rows = rows.saturating_add(u64::try_from(batch.length()).unwrap_or(u64::MAX));
                if rows > limits.max_rows {
                    return Err(IpcError::TooManyRows {
                        declared: rows,
                        limit: limits.max_rows,
                    });
                }
                decoded = decoded.saturating_add(check_buffers(batch, body, limits)?);
            }
            MessageHeader::DictionaryBatch => {
                let batch = message
                    .header_as_dictionary_batch()
                    .and_then(|dictionary| dictionary.data())
                    .ok_or_else(|| {
                        IpcError::Malformed("dictionary message without its values".into())
                    })?;
                decoded = decoded.saturating_add(check_buffers(batch, body, limits)?);
            }
            other => {
                return Err(IpcError::Malformed(format!(
                    "message {} is a {}, not a schema or a batch",
                    messages + 1,
                    other.variant_name().unwrap_or("message of an unknown kind")
                )));
            }
        }
        if decoded > limits.max_decoded_bytes {
            return Err(IpcError::TooLarge {
                declared: decoded,
                limit: limits.max_decoded_bytes,
            });
        }
        messages += 1;
    }
}

/// Reads one message's metadata length: the current framing (continuation marker, then
/// the length) or the legacy one (the length alone).
fn read_metadata_len(bytes: &[u8], at: &mut usize) -> Result<usize, IpcError> {
    let mut word = take(bytes, at, 4, "message length")?;
    if word == CONTINUATION {
        word = take(bytes, at, 4, "message length")?;
    }
    let len = i32::from_le_bytes([word[0], word[1], word[2], word[3]]);
    usize::try_from(len).map_err(|_| IpcError::Malformed(format!("negative message length {len}")))
}

/// The next `len` bytes, or why the stream ends inside them.
fn take<'a>(bytes: &'a [u8], at: &mut usize, len: usize, what: &str) -> Result<&'a [u8], IpcError> {
    let end = at
        .checked_add(len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            IpcError::Malformed(format!(
                "the {what} at byte {at} declares {len} bytes, but only {} follow",
                bytes.len() - *at
            ))
        })?;
    let slice = &bytes[*at..end];
    *at = end;
    Ok(slice)
}

/// Fields of a schema, nested ones included.
fn count_fields<'a>(fields: impl Iterator<Item = Field<'a>>) -> usize {
    fields
        .map(|field| {
            1 + field
                .children()
                .map_or(0, |children| count_fields(children.iter()))
        })
        .sum()
}

/// Checks a batch's buffers against its body and its codec against `limits`; gives the
/// bytes they take once decoded.
fn check_buffers(
    batch: arrow::ipc::RecordBatch<'_>,
    body: &[u8],
    limits: &IpcLimits,
) -> Result<u64, IpcError> {
    let compressed = match batch.compression().map(|c| c.codec()) {
        None => false,
        Some(CompressionType::ZSTD) if limits.allow_zstd => true,
        Some(CompressionType::ZSTD) => return Err(IpcError::Codec("zstd")),
        Some(CompressionType::LZ4_FRAME) => return Err(IpcError::Codec("LZ4")),
        Some(_) => return Err(IpcError::Codec("an unknown codec")),
    };
    let mut decoded = 0u64;
    for buffer in batch.buffers().into_iter().flatten() {
        let range = usize::try_from(buffer.offset())
            .ok()
            .zip(usize::try_from(buffer.length()).ok())
            .and_then(|(offset, len)| Some(offset..offset.checked_add(len)?))
            .filter(|range| range.end <= body.len())
            .ok_or_else(|| {
                IpcError::Malformed(format!(
                    "a buffer at offset {} of {} bytes lies outside its {}-byte body",
                    buffer.offset(),
                    buffer.length(),
                    body.len()
                ))
            })?;
        let stored = &body[range];
        decoded = decoded.saturating_add(if compressed && !stored.is_empty() {
            decoded_len(stored)?
        } else {
            stored.len() as u64
        });
    }
    Ok(decoded)
}

/// What a compressed buffer says it decompresses to.
fn decoded_len(stored: &[u8]) -> Result<u64, IpcError> {
    let prefix: [u8; COMPRESSED_PREFIX] = stored
        .get(..COMPRESSED_PREFIX)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| {
            IpcError::Malformed("a compressed buffer is shorter than its length prefix".into())
        })?;
    match i64::from_le_bytes(prefix) {
        STORED_UNCOMPRESSED => Ok((stored.len() - COMPRESSED_PREFIX) as u64),
        len => u64::try_from(len)
            .map_err(|_| IpcError::Malformed(format!("a compressed buffer declares length {len}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};

    use super::*;

    fn batch(rows: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows)),
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("row {i}")),
                )),
            ],
        )
        .unwrap()
    }

    fn encode(
        batches: &[RecordBatch],
        compression: Option<CompressionType>,
        finish: bool,
    ) -> Vec<u8> {
        let options = IpcWriteOptions::default()
            .try_with_compression(compression)
            .unwrap();
        let mut out = Vec::new();
        let mut writer =
            StreamWriter::try_new_with_options(&mut out, &batches[0].schema(), options).unwrap();
        for batch in batches {
            writer.write(batch).unwrap();
        }
        if finish {
            writer.finish().unwrap();
        } else {
            writer.flush().unwrap();
        }
        drop(writer);
        out
    }

    fn strict() -> IpcLimits {
        IpcLimits {
            max_rows: 1_000,
            max_columns: 8,
            max_decoded_bytes: 1 << 20,
            allow_zstd: true,
            require_end_marker: true,
        }
    }

    #[test]
    fn a_stream_within_limits_decodes_whole() {
        let bytes = encode(&[batch(10), batch(20)], Some(CompressionType::ZSTD), true);
        let (schema, batches) = decode_within(&bytes, &strict()).unwrap();
        assert_eq!(schema.unwrap().fields().len(), 2);
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 30);
    }

    #[test]
    fn rows_are_counted_over_the_whole_stream() {
        let bytes = encode(&[batch(600), batch(600)], None, true);
        let error = decode_within(&bytes, &strict()).unwrap_err();
        assert!(
            matches!(
                error,
                IpcError::TooManyRows {
                    declared: 1200,
                    limit: 1000
                }
            ),
            "{error}"
        );
        assert!(error.is_over_limit());
    }

    #[test]
    fn nested_fields_count_as_columns() {
        let inner = Field::new_list_field(DataType::Int64, true);
        let fields: Vec<Field> = (0..5)
            .map(|i| {
                Field::new(
                    format!("list{i}"),
                    DataType::List(Arc::new(inner.clone())),
                    true,
                )
            })
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let empty = RecordBatch::new_empty(Arc::clone(&schema));
        let bytes = encode(&[empty], None, true);
        let error = decode_within(&bytes, &strict()).unwrap_err();
        assert!(
            matches!(
                error,
                IpcError::TooManyColumns {
                    declared: 10,
                    limit: 8
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_cut_off_stream_is_refused_when_the_end_marker_is_required() {
        let whole = encode(&[batch(10), batch(10)], None, true);
        let unfinished = encode(&[batch(10), batch(10)], None, false);
        assert!(decode_within(&whole, &strict()).is_ok());
        let error = decode_within(&unfinished, &strict()).unwrap_err();
        assert!(matches!(error, IpcError::CutOff { messages: 3 }), "{error}");
        // Without the requirement the same bytes are a complete stream.
        let lenient = IpcLimits {
            require_end_marker: false,
            ..strict()
        };
        let (_, batches) = decode_within(&unfinished, &lenient).unwrap();
        assert_eq!(batches.len(), 2);
        // Bytes cut inside a message are broken either way.
        let error = decode_within(&whole[..whole.len() - 20], &lenient).unwrap_err();
        assert!(matches!(error, IpcError::Malformed(_)), "{error}");
    }

    #[test]
    fn empty_input_is_a_cut_off_stream_or_nothing() {
        assert!(matches!(
            decode_within(&[], &strict()),
            Err(IpcError::CutOff { messages: 0 })
        ));
        let (schema, batches) = decode_within(&[], &IpcLimits::generous()).unwrap();
        assert!(schema.is_none() && batches.is_empty());
    }

    /// Where each message of a stream lies: (metadata start, metadata length, body
    /// start), for tests that rewrite what a stream declares.
    fn message_spans(bytes: &[u8]) -> Vec<(usize, usize, usize)> {
        let mut at = 0;
        let mut spans = Vec::new();
        loop {
            let metadata_len = read_metadata_len(bytes, &mut at).unwrap();
            if metadata_len == 0 {
                return spans;
            }
            let metadata_at = at;
            at += metadata_len;
            let message = arrow::ipc::root_as_message(&bytes[metadata_at..at]).unwrap();
            spans.push((metadata_at, metadata_len, at));
            at += message.bodyLength() as usize;
        }
    }

    /// Rewrites the length prefix of every compressed buffer in the stream, as a hostile
    /// peer would: a few bytes that claim to decompress to `claimed`.
    fn claim_decoded_length(bytes: &mut [u8], claimed: i64) -> usize {
        let mut rewritten = 0;
        for (metadata_at, metadata_len, body_at) in message_spans(bytes) {
            let metadata = &bytes[metadata_at..metadata_at + metadata_len];
            let message = arrow::ipc::root_as_message(metadata).unwrap();
            let offsets: Vec<(usize, usize)> = message
                .header_as_record_batch()
                .and_then(|batch| batch.buffers())
                .into_iter()
                .flatten()
                .map(|b| (b.offset() as usize, b.length() as usize))
                .collect();
            for (offset, len) in offsets {
                if len >= COMPRESSED_PREFIX {
                    let start = body_at + offset;
                    bytes[start..start + COMPRESSED_PREFIX].copy_from_slice(&claimed.to_le_bytes());
                    rewritten += 1;
                }
            }
        }
        rewritten
    }

    #[test]
    fn a_small_batch_claiming_a_huge_decoded_size_is_refused_before_decoding() {
        let mut bytes = encode(&[batch(10)], Some(CompressionType::ZSTD), true);
        // A terabyte per buffer: Arrow's reader would try to allocate it.
        assert!(claim_decoded_length(&mut bytes, 1 << 40) > 0);
        let error = decode_within(&bytes, &strict()).unwrap_err();
        assert!(
            matches!(
                error,
                IpcError::TooLarge {
                    limit: 1_048_576,
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("TiB"), "{error}");
        // A negative length other than "stored uncompressed" is broken, not large.
        let mut bytes = encode(&[batch(10)], Some(CompressionType::ZSTD), true);
        claim_decoded_length(&mut bytes, -7);
        assert!(matches!(
            decode_within(&bytes, &strict()),
            Err(IpcError::Malformed(_))
        ));
    }

    /// Marks every compressed batch of the stream as compressed with `codec` (Weir
    /// builds Arrow without LZ4, so such a stream cannot be written directly).
    fn mark_codec(bytes: &mut [u8], codec: CompressionType) {
        for (metadata_at, metadata_len, _) in message_spans(bytes) {
            let metadata = &bytes[metadata_at..metadata_at + metadata_len];
            let message = arrow::ipc::root_as_message(metadata).unwrap();
            let codec_at = message
                .header_as_record_batch()
                .and_then(|batch| batch.compression())
                .map(|compression| {
                    let table = compression._tab;
                    let field = table.vtable().get(arrow::ipc::BodyCompression::VT_CODEC);
                    assert_ne!(field, 0, "the codec is written out");
                    metadata_at + table.loc() + usize::from(field)
                });
            if let Some(codec_at) = codec_at {
                bytes[codec_at] = codec.0 as u8;
            }
        }
    }

    #[test]
    fn codecs_other_than_allowed_ones_are_refused() {
        let mut lz4 = encode(&[batch(10)], Some(CompressionType::ZSTD), true);
        mark_codec(&mut lz4, CompressionType::LZ4_FRAME);
        let error = decode_within(&lz4, &IpcLimits::generous()).unwrap_err();
        assert!(matches!(error, IpcError::Codec("LZ4")), "{error}");
        let zstd = encode(&[batch(10)], Some(CompressionType::ZSTD), true);
        let no_zstd = IpcLimits {
            allow_zstd: false,
            ..strict()
        };
        assert!(matches!(
            decode_within(&zstd, &no_zstd),
            Err(IpcError::Codec("zstd"))
        ));
    }

    #[test]
    fn a_body_length_past_the_bytes_is_refused_without_allocating_it() {
        let mut bytes = encode(&[batch(10)], None, true);
        // The first message is the schema; its body is empty. Find the batch's metadata
        // and grow its declared body length far past the input.
        let mut at = 0;
        let schema_len = read_metadata_len(&bytes, &mut at).unwrap();
        at += schema_len;
        let batch_len = read_metadata_len(&bytes, &mut at).unwrap();
        let metadata = &bytes[at..at + batch_len];
        let body_len = arrow::ipc::root_as_message(metadata).unwrap().bodyLength();
        let needle = body_len.to_le_bytes();
        let position = metadata
            .windows(8)
            .position(|w| w == needle)
            .expect("the body length is stored inline in the metadata");
        bytes[at + position..at + position + 8].copy_from_slice(&(1i64 << 45).to_le_bytes());
        let error = decode_within(&bytes, &IpcLimits::generous()).unwrap_err();
        assert!(matches!(error, IpcError::Malformed(_)), "{error}");
        assert!(error.to_string().contains("message body"), "{error}");
    }

    /// Found by the `hub_ingest_body` fuzz target: a validity bitmap shorter than its
    /// rows, which Arrow's reader panics on.
    #[test]
    fn a_null_buffer_shorter_than_its_rows_is_refused_not_a_panic() {
        let bytes = include_bytes!("../tests/data/ipc_fuzz_null_buffer_too_short.arrows");
        let error = decode_within(bytes, &IpcLimits::generous()).unwrap_err();
        assert!(matches!(error, IpcError::Decode(_)), "{error}");
    }

    /// Found by the `module_answer_body` fuzz target: an integer column of a width no
    /// Arrow type has, which Arrow's schema reader panics on.
    #[test]
    fn an_integer_of_a_width_arrow_has_no_type_for_is_refused_not_a_panic() {
        let bytes = include_bytes!("../tests/data/ipc_fuzz_int_of_odd_width.arrows");
        let error = decode_within(bytes, &IpcLimits::generous()).unwrap_err();
        assert!(matches!(error, IpcError::Decode(_)), "{error}");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [
            &b"hello"[..],
            &[0xFF, 0xFF, 0xFF, 0xFF, 0x10, 0, 0, 0][..],
            &[0xFF, 0xFF, 0xFF, 0xFF, 0xF0, 0xFF, 0xFF, 0xFF][..],
            &[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8][..],
        ] {
            assert!(
                matches!(
                    decode_within(bytes, &IpcLimits::generous()),
                    Err(IpcError::Malformed(_))
                ),
                "{bytes:?}"
            );
        }
    }
}
