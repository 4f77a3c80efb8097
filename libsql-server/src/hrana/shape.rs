//! How much a request may hold once decoded, checked on its bytes before it is decoded.
//!
//! A body within `--max-body-size` can still decode into far more memory than it takes: an
//! empty batch step is 2 bytes of protobuf and 136 bytes decoded, an empty request 12 bytes
//! of JSON and 104 decoded. So every Hrana body and WebSocket message is first walked without
//! building anything, counting its values (JSON: every scalar, array and object; protobuf:
//! every field, and the fields of every length-delimited field that parses as a message),
//! and one holding more than `--max-request-values` is refused whole.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A request holding more values than the bound.
#[derive(Debug, thiserror::Error)]
#[error("the request holds more than {0} values (--max-request-values); send it in parts")]
pub struct TooManyValues(pub usize);

/// Why a protobuf message is refused before it is decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtobufRefused {
    #[error(transparent)]
    TooManyValues(#[from] TooManyValues),
    #[error("the body is not a protobuf message")]
    NotAMessage,
}

/// Counts the values of a JSON text, up to `max`. Text that is not JSON passes: the decoder
/// that follows reports it precisely.
pub fn check_json(text: &[u8], max: usize) -> Result<(), TooManyValues> {
    let mut counter = Counter { left: max, exceeded: false };
    let mut de = serde_json::Deserializer::from_slice(text);
    let _ = (&mut counter).deserialize(&mut de);
    if counter.exceeded {
        return Err(TooManyValues(max));
    }
    Ok(())
}

struct Counter {
    left: usize,
    exceeded: bool,
}

impl Counter {
    fn take<E: serde::de::Error>(&mut self) -> Result<(), E> {
        match self.left.checked_sub(1) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => {
                self.exceeded = true;
                Err(E::custom("too many values"))
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for &mut Counter {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for &mut Counter {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.take()
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.take()
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.take()
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.take()
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.take()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.take()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.take()?;
        while seq.next_element_seed(&mut *self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.take()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(&mut *self)?;
        }
        Ok(())
    }
}

/// How deep length-delimited fields are looked into (Hrana's messages nest about 7 deep).
/// Below that, a payload counts as many values as it could hold: one per 2 bytes (the
/// smallest field), which bounds the walk's work without letting deep nesting hide values.
const PROTOBUF_DEPTH: usize = 10;

/// Counts the fields of a protobuf message, up to `max`. Bytes that are not a message are
/// refused too (decoders skip what they do not know, groups included, so what this walk
/// cannot read must not pass unchecked).
pub fn check_protobuf(bytes: &[u8], max: usize) -> Result<(), ProtobufRefused> {
    let mut left = max;
    let mut rest = bytes;
    match walk(&mut rest, 0, &mut left, None) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ProtobufRefused::NotAMessage),
        Err(()) => Err(TooManyValues(max).into()),
    }
}

/// Walks fields off the front of `bytes` as a message (or, with `group`, as that group's
/// fields up to its end tag), taking one from `left` per field, nested ones included.
/// `Ok(false)`: not a message (nothing taken); `Err`: `left` ran out.
fn walk(bytes: &mut &[u8], depth: usize, left: &mut usize, group: Option<u64>) -> Result<bool, ()> {
    let mut count = *left;
    loop {
        if bytes.is_empty() {
            // A group must end with its end tag.
            if group.is_some() {
                return Ok(false);
            }
            break;
        }
        let Some(key) = varint(bytes) else { return Ok(false) };
        let field = key >> 3;
        if field == 0 {
            return Ok(false);
        }
        // Each field is read whole before it is counted: bytes that are not a message must
        // not use up the count.
        let mut nested = None;
        match key & 7 {
            0 => {
                if varint(bytes).is_none() {
                    return Ok(false);
                }
            }
            1 | 5 => {
                let width = if key & 7 == 1 { 8 } else { 4 };
                let Some(rest) = bytes.get(width..) else { return Ok(false) };
                *bytes = rest;
            }
            2 => {
                let Some(len) = varint(bytes).and_then(|l| usize::try_from(l).ok()) else { return Ok(false) };
                let Some(payload) = bytes.get(..len) else { return Ok(false) };
                *bytes = &bytes[len..];
                nested = Some(payload);
            }
            3 => {
                // Groups are not Hrana's; deep ones are refused rather than walked.
                if depth >= PROTOBUF_DEPTH {
                    return Ok(false);
                }
                let mut inner = count;
                if !walk(bytes, depth + 1, &mut inner, Some(field))? {
                    return Ok(false);
                }
                count = inner.checked_sub(1).ok_or(())?;
                continue;
            }
            4 if group == Some(field) => break,
            _ => return Ok(false),
        }
        count = count.checked_sub(1).ok_or(())?;
        if let Some(payload) = nested {
            if depth >= PROTOBUF_DEPTH {
                count = count.checked_sub(payload.len() / 2).ok_or(())?;
            } else {
                // A nested message's fields count too; a string's or bytes' do not.
                let mut inner = count;
                let mut rest = payload;
                if walk(&mut rest, depth + 1, &mut inner, None)? {
                    count = inner;
                }
            }
        }
    }
    *left = count;
    Ok(true)
}

/// Reads a base-128 varint off the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_counted_at_every_depth() {
        let text = br#"{"requests":[{"type":"close"},{"type":"execute","stmt":{"sql":"x","args":[1,2]}}]}"#;
        // Objects 4, arrays 2, scalars 5 ("close", "execute", "x", 1, 2).
        assert!(check_json(text, 11).is_ok());
        assert!(check_json(text, 10).is_err());
        assert!(check_json(b"not json", 1).is_ok(), "the decoder reports it");
        let many = format!("[{}]", vec!["{}"; 1000].join(","));
        assert!(check_json(many.as_bytes(), 1000).is_err());
    }

    #[test]
    fn protobuf_fields_are_counted_in_nested_messages_not_in_strings() {
        // Field 2 (length-delimited) holding a message with field 1 = varint 5, twice over.
        let nested = [0x12, 0x02, 0x08, 0x05, 0x12, 0x02, 0x08, 0x05];
        assert!(check_protobuf(&nested, 4).is_ok());
        assert!(check_protobuf(&nested, 3).is_err());
        // A string whose bytes are not a message counts as one value.
        let text = [0x0a, 0x03, b'S', b'E', b'L'];
        assert!(check_protobuf(&text, 1).is_ok());
        // Many empty entries: two bytes each.
        let empties: Vec<u8> = std::iter::repeat([0x12u8, 0x00]).take(1000).flatten().collect();
        assert!(check_protobuf(&empties, 1000).is_ok());
        assert!(matches!(check_protobuf(&empties, 999), Err(ProtobufRefused::TooManyValues(_))));
        // What this walk cannot read as a message is refused (decoders would skip parts).
        assert!(matches!(check_protobuf(&[0xff], 1), Err(ProtobufRefused::NotAMessage)));
        // Groups (which decoders skip when unknown) are walked: their fields count.
        let mut grouped = vec![0x7b]; // field 15, start group
        grouped.extend(&empties);
        grouped.push(0x7c); // field 15, end group
        assert!(check_protobuf(&grouped, 1001).is_ok());
        assert!(check_protobuf(&grouped, 1000).is_err());
        assert!(check_protobuf(&[0x7b, 0x12, 0x00], 10).is_err(), "a group without its end");
        // Nesting deeper than the walk looks counts by size: one value per 2 bytes.
        let mut deep = empties.clone();
        for _ in 0..12 {
            let mut outer = vec![0x12];
            let mut len = deep.len();
            while len >= 0x80 {
                outer.push((len as u8 & 0x7f) | 0x80);
                len >>= 7;
            }
            outer.push(len as u8);
            outer.extend(&deep);
            deep = outer;
        }
        assert!(check_protobuf(&deep, 900).is_err(), "values hidden deep are still counted");
    }
}
