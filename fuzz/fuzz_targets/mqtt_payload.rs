//! An MQTT payload as a broker delivers it, decoded as JSON, a JSON array or CSV into a
//! schema of every kind of column a pipeline declares: rows or a reason, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use weir_engine::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use weir_operators::sources::mqtt::{PayloadFormat, decode_payload};

fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("device", DataType::Utf8, false),
                Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
                Field::new("value", DataType::Float64, true),
                Field::new("count", DataType::Int64, true),
                Field::new("ok", DataType::Boolean, true),
            ]))
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the format, the rest is the payload.
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    let format = match which % 3 {
        0 => PayloadFormat::Json,
        1 => PayloadFormat::JsonArray,
        _ => PayloadFormat::Csv,
    };
    if let Ok(batch) = decode_payload(format, schema(), payload) {
        assert_eq!(batch.schema(), schema());
    }
});
