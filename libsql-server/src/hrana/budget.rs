//! How much memory answers may take: each response is bounded (`--max-response-size`), and so
//! are all responses in flight together (`--max-total-response-size`). Rows are charged as
//! they are collected, so a `SELECT` of a gigabyte stops at the bound instead of being held
//! whole; the charge is held until the answer has been sent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use libsql_sys::rusqlite::types::ValueRef;

use crate::limit_hits::{Limit, LimitHits};

/// Bytes taken from the shared bound at a time, so most rows cost no atomic operation.
const RESERVE_STEP: usize = 64 * 1024;

/// The server's bounds; hands out one [`ResponseBudget`] per request.
pub struct ResponseBudgets {
    max_response: usize,
    total: Arc<Total>,
    hits: Arc<LimitHits>,
}

struct Total {
    used: AtomicUsize,
    max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("the response is larger than {0} bytes (--max-response-size); fetch fewer rows at a time")]
    TooLarge(usize),
    #[error("the server is holding too many large responses (--max-total-response-size); retry later")]
    ServerFull,
}

impl ResponseBudgets {
    pub fn new(max_response: usize, max_total: usize, hits: Arc<LimitHits>) -> Self {
        ResponseBudgets { max_response, total: Arc::new(Total { used: AtomicUsize::new(0), max: max_total }), hits }
    }

    /// A request's budget; it also keeps `hold` (the request's place among the running
    /// requests) until the answer has been sent, or, if the client left, until the request's
    /// blocking work has ended: a vanished client frees no place its work still uses.
    pub fn start(&self, hold: Hold) -> ResponseBudget {
        ResponseBudget { max: self.max_response, used: 0, reserved: 0, total: self.total.clone(), hits: self.hits.clone(), _hold: hold }
    }

    /// Bytes held by responses in flight right now.
    pub fn in_flight(&self) -> usize {
        self.total.used.load(Ordering::Relaxed)
    }
}

/// Whatever a request holds for as long as its budget (see [`ResponseBudgets::start`]).
pub type Hold = Option<Box<dyn Send>>;

/// One request's share; gives its reservation back when dropped.
pub struct ResponseBudget {
    max: usize,
    used: usize,
    reserved: usize,
    total: Arc<Total>,
    hits: Arc<LimitHits>,
    _hold: Hold,
}

impl ResponseBudget {
    /// Charges `bytes` more of answer.
    pub fn charge(&mut self, bytes: usize) -> Result<(), BudgetError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.max {
            self.hits.hit(Limit::ResponseSize, format_args!("a response passed {} bytes", self.max));
            return Err(BudgetError::TooLarge(self.max));
        }
        while self.used > self.reserved {
            let before = self.total.used.fetch_add(RESERVE_STEP, Ordering::Relaxed);
            if before + RESERVE_STEP > self.total.max {
                self.total.used.fetch_sub(RESERVE_STEP, Ordering::Relaxed);
                self.hits.hit(Limit::TotalResponseSize, format_args!("responses in flight passed {} bytes", self.total.max));
                return Err(BudgetError::ServerFull);
            }
            self.reserved += RESERVE_STEP;
        }
        Ok(())
    }

    /// How much is charged so far.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Gives back what was charged since `used` was `mark` (a statement whose rows are not
    /// in the answer after all). The reservation is kept until the budget is dropped.
    pub fn rewind(&mut self, mark: usize) {
        self.used = self.used.min(mark);
    }

    /// What one value costs in an answer, before it is copied out of SQLite: its JSON form,
    /// roughly (blobs grow by a third in base64, a control character in text takes six bytes,
    /// a quote or backslash two, every value carries its type).
    pub fn value_size(value: ValueRef<'_>) -> usize {
        const OVERHEAD: usize = 24;
        OVERHEAD
            + match value {
                ValueRef::Text(text) => text.len() + text.iter().map(|b| escape_cost(*b)).sum::<usize>(),
                ValueRef::Blob(blob) => blob.len() / 3 * 4 + 4,
                ValueRef::Integer(_) | ValueRef::Real(_) => 20,
                ValueRef::Null => 0,
            }
    }
}

impl ResponseBudget {
    /// What a value already read (from the primary, say) costs: the same as [`value_size`].
    ///
    /// [`value_size`]: ResponseBudget::value_size
    pub fn hrana_value_size(value: &libsql_hrana::proto::Value) -> usize {
        use libsql_hrana::proto::Value;
        Self::value_size(match value {
            Value::None | Value::Null => ValueRef::Null,
            Value::Integer { value } => ValueRef::Integer(*value),
            Value::Float { value } => ValueRef::Real(*value),
            Value::Text { value } => ValueRef::Text(value.as_bytes()),
            Value::Blob { value } => ValueRef::Blob(value),
        })
    }
}

/// Bytes a text byte adds when escaped in JSON.
fn escape_cost(byte: u8) -> usize {
    match byte {
        b'"' | b'\\' => 1,
        0..=0x1f => 5,
        _ => 0,
    }
}

impl Drop for ResponseBudget {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.total.used.fetch_sub(self.reserved, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_response_and_all_together_are_bounded_and_released() {
        let budgets = ResponseBudgets::new(200_000, 2 * RESERVE_STEP, Arc::default());
        let mut a = budgets.start(None);
        a.charge(100_000).unwrap();
        assert_eq!(a.charge(100_001), Err(BudgetError::TooLarge(200_000)));
        let mut b = budgets.start(None);
        assert_eq!(b.charge(RESERVE_STEP), Err(BudgetError::ServerFull), "a holds two steps, b may not take two more");
        drop(a);
        assert_eq!(budgets.in_flight(), 0);
        b.charge(RESERVE_STEP).unwrap();
        drop(b);
        assert_eq!(budgets.in_flight(), 0);
    }
}
