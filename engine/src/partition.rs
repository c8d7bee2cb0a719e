//! Key-partitioned edges: each row goes to one of a node's parallel instances, chosen by
//! a hash of its key columns, so every row of a key meets the same instance (and its
//! state) however many batches and producers it comes through.
//!
//! The hash is specified here, not left to a library's choice: XXH64 (seed 0) of each
//! key value's text, combined column by column. It must never change, because
//! checkpointed state is kept per instance and a restart must route each key back to the
//! instance that holds its state.

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use twox_hash::XxHash64;

/// How the rows of one producer's port are split over a consumer's instances.
#[derive(Debug, Clone)]
pub(crate) struct KeyRouter {
    /// The key columns' indices in the producer's schema.
    keys: Vec<usize>,
    /// How many instances the consumer runs.
    instances: usize,
}

/// The hash a null key value counts as.
const NULL_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

impl KeyRouter {
    /// A router over the columns `keys` of `schema`, for `instances` instances. Fails
    /// naming the first key the schema does not have.
    pub(crate) fn new(
        schema: &SchemaRef,
        keys: &[String],
        instances: usize,
    ) -> Result<Self, String> {
        let keys = keys
            .iter()
            .map(|key| {
                schema.index_of(key).map_err(|_| {
                    let columns: Vec<&str> =
                        schema.fields().iter().map(|f| f.name().as_str()).collect();
                    format!(
                        "partition key '{key}' is not a column of its input (columns: {})",
                        columns.join(", ")
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err("a partitioned node needs at least one partition key".into());
        }
        Ok(KeyRouter {
            keys,
            instances: instances.max(1),
        })
    }

    /// The instance each row of `batch` goes to.
    pub(crate) fn route(&self, batch: &RecordBatch) -> Result<Vec<usize>, ArrowError> {
        let mut hashes = vec![0u64; batch.num_rows()];
        for &key in &self.keys {
            let column = key_text(batch.column(key))?;
            let text = column.as_string::<i32>();
            for (row, hash) in hashes.iter_mut().enumerate() {
                let value = if text.is_null(row) {
                    NULL_HASH
                } else {
                    XxHash64::oneshot(0, text.value(row).as_bytes())
                };
                *hash = hash.rotate_left(29) ^ value;
            }
        }
        Ok(hashes
            .into_iter()
            .map(|hash| (hash % self.instances as u64) as usize)
            .collect())
    }

    /// `batch` split by instance: entry `i` holds the rows instance `i` gets, or `None`
    /// when it gets none. Rows keep their order within each part.
    pub(crate) fn split(
        &self,
        batch: &RecordBatch,
    ) -> Result<Vec<Option<RecordBatch>>, ArrowError> {
        let routes = self.route(batch)?;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.instances];
        for (row, instance) in routes.into_iter().enumerate() {
            let row = u32::try_from(row)
                .map_err(|_| ArrowError::ComputeError("a batch of over 2^32 rows".into()))?;
            rows[instance].push(row);
        }
        rows.into_iter()
            .map(|rows| match rows.len() {
                0 => Ok(None),
                n if n == batch.num_rows() => Ok(Some(batch.clone())),
                _ => take_record_batch(batch, &UInt32Array::from(rows)).map(Some),
            })
            .collect()
    }
}

/// A key column as UTF-8 text: strings as they are, anything else through Arrow's cast,
/// so that equal values hash alike whatever their column's type.
fn key_text(column: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    match column.data_type() {
        DataType::Utf8 => Ok(column.clone()),
        _ => cast(column, &DataType::Utf8),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn batch(devices: &[Option<&str>], values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("v", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(devices.to_vec())),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn every_row_of_a_key_goes_to_the_same_instance_in_any_batch() {
        let first = batch(
            &[Some("a"), Some("b"), Some("c"), Some("a"), None],
            &[1, 2, 3, 4, 5],
        );
        let later = batch(&[Some("c"), None, Some("a")], &[6, 7, 8]);
        let router = KeyRouter::new(&first.schema(), &["device".into()], 4).unwrap();
        let first_routes = router.route(&first).unwrap();
        let later_routes = router.route(&later).unwrap();
        assert_eq!(first_routes[0], first_routes[3]);
        assert_eq!(first_routes[2], later_routes[0]);
        assert_eq!(first_routes[4], later_routes[1]);
        assert_eq!(first_routes[0], later_routes[2]);
        assert!(first_routes.iter().all(|&instance| instance < 4));
    }

    #[test]
    fn the_hash_is_fixed_so_restarts_route_keys_to_the_state_they_left() {
        // These routes are what a checkpoint taken by any earlier build relies on.
        let keys = batch(
            &[
                Some("dev-0"),
                Some("dev-1"),
                Some("dev-2"),
                Some("dev-3"),
                None,
            ],
            &[0; 5],
        );
        let router = KeyRouter::new(&keys.schema(), &["device".into()], 4).unwrap();
        let expected: Vec<usize> = ["dev-0", "dev-1", "dev-2", "dev-3"]
            .iter()
            .map(|key| (XxHash64::oneshot(0, key.as_bytes()) % 4) as usize)
            .chain([(NULL_HASH % 4) as usize])
            .collect();
        assert_eq!(router.route(&keys).unwrap(), expected);
        // Integers hash as their text: 7 and "7" meet.
        let router = KeyRouter::new(&keys.schema(), &["v".into()], 4).unwrap();
        assert_eq!(
            router.route(&keys).unwrap()[0],
            (XxHash64::oneshot(0, b"0") % 4) as usize
        );
    }

    #[test]
    fn a_split_keeps_every_row_once_and_in_order() {
        let rows = batch(
            &[
                Some("a"),
                Some("b"),
                Some("c"),
                Some("d"),
                Some("a"),
                Some("e"),
            ],
            &[1, 2, 3, 4, 5, 6],
        );
        let router = KeyRouter::new(&rows.schema(), &["device".into()], 3).unwrap();
        let parts = router.split(&rows).unwrap();
        assert_eq!(parts.len(), 3);
        let mut seen: Vec<i64> = Vec::new();
        for part in parts.iter().flatten() {
            let values = part.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            let values: Vec<i64> = values.values().to_vec();
            assert!(
                values.windows(2).all(|pair| pair[0] < pair[1]),
                "{values:?}"
            );
            seen.extend(values);
        }
        seen.sort_unstable();
        assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_key_that_is_not_a_column_is_named() {
        let rows = batch(&[Some("a")], &[1]);
        let error = KeyRouter::new(&rows.schema(), &["site".into()], 2).unwrap_err();
        assert_eq!(
            error,
            "partition key 'site' is not a column of its input (columns: device, v)"
        );
    }
}
