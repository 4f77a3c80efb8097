//! Values as the proxy protocol carries them: the bytes of a value serialized the way the
//! `libsql` crate and libSQL server replicas do (bincode 1: a little-endian `u32` variant
//! index, Null 0, Integer 1, Real 2, Text 3, Blob 4; then an `i64` or `f64`, or a `u64`
//! length and the bytes).

use std::sync::Arc;

use bytes::Bytes;
use libsql_hrana::proto::Value;
use libsql_replication::rpc::proxy::Value as ProxyValue;

/// Bytes that are not a value in this layout.
#[derive(Debug, thiserror::Error)]
#[error("a value is not serialized in the proxy protocol's layout")]
pub struct BadValue;

pub fn encode(value: &Value) -> ProxyValue {
    let mut data = Vec::new();
    let mut bytes = |variant: u32, payload: &[u8]| {
        data.extend_from_slice(&variant.to_le_bytes());
        data.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        data.extend_from_slice(payload);
    };
    match value {
        Value::None | Value::Null => data.extend_from_slice(&0u32.to_le_bytes()),
        Value::Integer { value } => {
            data.extend_from_slice(&1u32.to_le_bytes());
            data.extend_from_slice(&value.to_le_bytes());
        }
        Value::Float { value } => {
            data.extend_from_slice(&2u32.to_le_bytes());
            data.extend_from_slice(&value.to_le_bytes());
        }
        Value::Text { value } => bytes(3, value.as_bytes()),
        Value::Blob { value } => bytes(4, value),
    }
    ProxyValue { data }
}

pub fn decode(data: &[u8]) -> Result<Value, BadValue> {
    let bad = || BadValue;
    let (variant, rest) = data.split_first_chunk::<4>().ok_or_else(bad)?;
    let fixed = |rest: &[u8]| -> Result<[u8; 8], BadValue> { rest.try_into().map_err(|_| bad()) };
    let sized = |rest: &[u8]| -> Result<Vec<u8>, BadValue> {
        let (len, payload) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        if u64::from_le_bytes(*len) != payload.len() as u64 {
            return Err(bad());
        }
        Ok(payload.to_vec())
    };
    Ok(match u32::from_le_bytes(*variant) {
        0 if rest.is_empty() => Value::Null,
        1 => Value::Integer { value: i64::from_le_bytes(fixed(rest)?) },
        2 => Value::Float { value: f64::from_le_bytes(fixed(rest)?) },
        3 => Value::Text { value: Arc::from(String::from_utf8(sized(rest)?).map_err(|_| bad())?) },
        4 => Value::Blob { value: Bytes::from(sized(rest)?) },
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_in_the_clients_layout() {
        assert_eq!(encode(&Value::Null).data, [0, 0, 0, 0]);
        assert_eq!(encode(&Value::Integer { value: -2 }).data, [1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(encode(&Value::Text { value: "hé".into() }).data, [3, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, b'h', 0xc3, 0xa9]);
        for v in [
            Value::Null,
            Value::Integer { value: i64::MIN },
            Value::Float { value: 1.5 },
            Value::Text { value: "text".into() },
            Value::Blob { value: Bytes::from_static(&[0, 1, 2]) },
        ] {
            let back = decode(&encode(&v).data).unwrap();
            assert_eq!(format!("{back:?}"), format!("{v:?}"));
        }
        for bad in [&[][..], &[9, 0, 0, 0], &[1, 0, 0, 0, 1], &[3, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, b'a'], &[0, 0, 0, 0, 1]] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }
}
