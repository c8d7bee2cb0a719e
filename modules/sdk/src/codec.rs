//! Batch bodies: Arrow IPC streams (a schema, zero or more batches, the end marker).

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{ArrowError, SchemaRef};

/// Writes `batches` (all of `schema`) as one IPC stream.
pub fn encode_stream(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let size: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
    let mut writer = StreamWriter::try_new(Vec::with_capacity(size + 1024), schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.into_inner()
}

/// Reads an IPC stream into its schema and batches. An empty body is no batches and no
/// schema.
pub fn decode_stream(bytes: &[u8]) -> Result<(Option<SchemaRef>, Vec<RecordBatch>), ArrowError> {
    if bytes.is_empty() {
        return Ok((None, Vec::new()));
    }
    let reader = StreamReader::try_new(bytes, None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((Some(schema), batches))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, StringArray};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn batches_survive_the_round_trip() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("value", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("a"), None])),
                Arc::new(Float64Array::from(vec![1.5, -2.0])),
            ],
        )
        .unwrap();
        let bytes = encode_stream(&schema, &[batch.clone(), batch.slice(1, 1)]).unwrap();
        let (decoded_schema, batches) = decode_stream(&bytes).unwrap();
        assert_eq!(decoded_schema, Some(schema.clone()));
        assert_eq!(batches, [batch.clone(), batch.slice(1, 1)]);

        let empty = encode_stream(&schema, &[]).unwrap();
        assert_eq!(decode_stream(&empty).unwrap(), (Some(schema), vec![]));
        assert_eq!(decode_stream(&[]).unwrap(), (None, vec![]));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_stream(b"not arrow at all").is_err());
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let bytes = encode_stream(&schema, &[]).unwrap();
        assert!(decode_stream(&bytes[..bytes.len() / 2]).is_err());
    }
}
