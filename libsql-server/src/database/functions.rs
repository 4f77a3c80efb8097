//! Bounded replacements for the engine's functions whose one call could outrun every time
//! limit. The progress handler (`interrupt`) runs between virtual-machine steps, never inside
//! a function call, and values may be megabytes long, so the built-in `instr`, `replace`,
//! `trim`, `LIKE` and `GLOB` could each spend minutes to hours in one call on crafted inputs
//! (they compare the pattern at every position, or every character against every character
//! of a set). Here:
//!
//! - `instr` and `replace` search with a linear-time algorithm (`memchr::memmem`);
//! - `trim`, `ltrim` and `rtrim` compare as SQLite does, but stop when the statement must;
//! - `LIKE` and `GLOB` run SQLite's own matcher (`sqlite3_strlike`, `sqlite3_strglob`), whose
//!   work is bounded by the product of the pattern's and the text's lengths: a call whose
//!   product is past [`MATCH_WORK_LIMIT`] is refused, and a call checks the statement's stop
//!   conditions before it starts.
//!
//! Each gives SQLite's answer for every input (NULLs, numbers as text, blobs, invalid UTF-8).
//! They replace sqlean's `ltrim`/`rtrim` too, which the engine registers over SQLite's.
//! SQLite's LIKE optimisation (an index range for `LIKE 'abc%'`) needs the built-in function,
//! so it no longer applies; `GLOB 'abc*'` and `>=`/`<` ranges still use indexes.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Arc;

use libsql_sys::rusqlite::{self, ffi};
use memchr::memmem;

use super::interrupt::Interrupt;

/// Pattern bytes × text bytes above which one `LIKE`/`GLOB` call is refused: SQLite's matcher
/// needs about a nanosecond per unit at worst, so an allowed call ends within seconds.
pub const MATCH_WORK_LIMIT: u64 = 1 << 32;

/// Comparisons between two checks of the statement's stop conditions (a clock read each).
const CHECK_EVERY: u64 = 1 << 20;

/// Registers the replacements on `conn`; each call can see the connection's stop conditions.
pub fn install(conn: &rusqlite::Connection, interrupt: &Arc<Interrupt>) -> rusqlite::Result<()> {
    let functions: [(&CStr, c_int, Func); 10] = [
        (c"instr", 2, instr),
        (c"replace", 3, replace),
        (c"trim", 1, trim_both),
        (c"trim", 2, trim_both),
        (c"ltrim", 1, trim_left),
        (c"ltrim", 2, trim_left),
        (c"rtrim", 1, trim_right),
        (c"rtrim", 2, trim_right),
        (c"like", 2, like),
        (c"like", 3, like),
    ];
    let all = functions.into_iter().chain([(c"glob", 2, glob as Func)]);
    for (name, args, func) in all {
        let data = Arc::into_raw(interrupt.clone()) as *mut c_void;
        // SAFETY: the handle is open; `data` is an `Arc` that `drop_interrupt` releases when
        // the function is replaced or the connection closes (also when registration fails).
        let rc = unsafe {
            ffi::sqlite3_create_function_v2(
                conn.handle(),
                name.as_ptr(),
                args,
                ffi::SQLITE_UTF8 | ffi::SQLITE_DETERMINISTIC | ffi::SQLITE_INNOCUOUS,
                data,
                Some(func),
                None,
                None,
                Some(drop_interrupt),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), Some(format!("registering {name:?}"))));
        }
    }
    Ok(())
}

type Func = unsafe extern "C" fn(*mut ffi::sqlite3_context, c_int, *mut *mut ffi::sqlite3_value);

unsafe extern "C" fn drop_interrupt(data: *mut c_void) {
    drop(Arc::from_raw(data as *const Interrupt));
}

/// One call's arguments and result, over SQLite's raw interface.
struct Call {
    ctx: *mut ffi::sqlite3_context,
    args: *mut *mut ffi::sqlite3_value,
}

impl Call {
    fn arg(&self, i: usize) -> *mut ffi::sqlite3_value {
        // SAFETY: SQLite passes as many arguments as the function was registered with.
        unsafe { *self.args.add(i) }
    }

    fn is_null(&self, i: usize) -> bool {
        unsafe { ffi::sqlite3_value_type(self.arg(i)) == ffi::SQLITE_NULL }
    }

    fn is_blob(&self, i: usize) -> bool {
        unsafe { ffi::sqlite3_value_type(self.arg(i)) == ffi::SQLITE_BLOB }
    }

    /// The argument as text (numbers converted, as SQLite's functions see them); `None` for
    /// NULL or when SQLite is out of memory. Valid until the argument is converted again.
    fn text(&self, i: usize) -> Option<&[u8]> {
        // SAFETY: `sqlite3_value_text` returns a buffer of `sqlite3_value_bytes` bytes (asked
        // after it, as SQLite documents), owned by the value for the rest of the call.
        unsafe {
            let p = ffi::sqlite3_value_text(self.arg(i));
            if p.is_null() {
                return None;
            }
            let n = ffi::sqlite3_value_bytes(self.arg(i));
            Some(std::slice::from_raw_parts(p, n as usize))
        }
    }

    fn blob(&self, i: usize) -> &[u8] {
        unsafe {
            let p = ffi::sqlite3_value_blob(self.arg(i));
            let n = ffi::sqlite3_value_bytes(self.arg(i));
            if p.is_null() || n <= 0 {
                return &[];
            }
            std::slice::from_raw_parts(p as *const u8, n as usize)
        }
    }

    fn interrupt(&self) -> &Interrupt {
        // SAFETY: registered with an `Arc<Interrupt>` that lives as long as the function.
        unsafe { &*(ffi::sqlite3_user_data(self.ctx) as *const Interrupt) }
    }

    fn limit(&self, which: c_int) -> u64 {
        unsafe { ffi::sqlite3_limit(ffi::sqlite3_context_db_handle(self.ctx), which, -1).max(0) as u64 }
    }

    /// Stops the call with `SQLITE_INTERRUPT` when the statement must stop; the connection
    /// then reports the reason, as for any interrupted statement.
    fn must_stop(&self) -> bool {
        let stop = self.interrupt().reason().is_some();
        if stop {
            unsafe { ffi::sqlite3_result_error_code(self.ctx, ffi::SQLITE_INTERRUPT) };
        }
        stop
    }

    fn int(&self, v: i64) {
        unsafe { ffi::sqlite3_result_int64(self.ctx, v) }
    }

    fn text_result(&self, v: &[u8]) {
        if v.len() as u64 > self.limit(ffi::SQLITE_LIMIT_LENGTH) {
            return unsafe { ffi::sqlite3_result_error_toobig(self.ctx) };
        }
        unsafe {
            ffi::sqlite3_result_text64(
                self.ctx,
                v.as_ptr() as *const c_char,
                v.len() as u64,
                ffi::SQLITE_TRANSIENT(),
                ffi::SQLITE_UTF8 as u8,
            )
        }
    }

    fn error(&self, message: &str) {
        unsafe { ffi::sqlite3_result_error(self.ctx, message.as_ptr() as *const c_char, message.len() as c_int) }
    }

    fn out_of_memory(&self) {
        unsafe { ffi::sqlite3_result_error_nomem(self.ctx) }
    }
}

/// Continuation bytes of UTF-8 (`10xxxxxx`): SQLite never starts a character at one.
fn is_continuation(b: u8) -> bool {
    b & 0xc0 == 0x80
}

/// `instr(X, Y)`: the 1-based character (byte, for two blobs) position of the first `Y` in
/// `X`, 0 if none, NULL if either is NULL.
unsafe extern "C" fn instr(ctx: *mut ffi::sqlite3_context, _: c_int, args: *mut *mut ffi::sqlite3_value) {
    let call = Call { ctx, args };
    if call.is_null(0) || call.is_null(1) {
        return;
    }
    if call.is_blob(0) && call.is_blob(1) {
        let (haystack, needle) = (call.blob(0), call.blob(1));
        let at = if needle.is_empty() { Some(0) } else { memmem::find(haystack, needle) };
        return call.int(at.map_or(0, |p| p as i64 + 1));
    }
    // A blob beside text is compared as text: its bytes, read without converting the value.
    let side = |i| if call.is_blob(i) { Some(call.blob(i)) } else { call.text(i) };
    let (Some(haystack), Some(needle)) = (side(0), side(1)) else {
        return call.out_of_memory();
    };
    call.int(text_position(haystack, needle))
}

/// SQLite tries a text needle at the start and at every byte that starts a character. A
/// needle that starts a character can only match where a character starts; one that starts
/// with a continuation byte (invalid UTF-8) only at the very start.
fn text_position(haystack: &[u8], needle: &[u8]) -> i64 {
    if needle.is_empty() {
        return 1;
    }
    let at = if is_continuation(needle[0]) { haystack.starts_with(needle).then_some(0) } else { memmem::find(haystack, needle) };
    match at {
        Some(p) => 1 + haystack[1..=p].iter().filter(|b| !is_continuation(**b)).count() as i64,
        None => 0,
    }
}

/// `replace(X, Y, Z)`: `X` with every non-overlapping `Y` (leftmost first) replaced by `Z`.
unsafe extern "C" fn replace(ctx: *mut ffi::sqlite3_context, _: c_int, args: *mut *mut ffi::sqlite3_value) {
    let call = Call { ctx, args };
    let Some(text) = call.text(0) else { return };
    let Some(pattern) = call.text(1) else { return };
    // SQLite reads the pattern as a C string here: one that starts with NUL is empty.
    if pattern.first().is_none_or(|b| *b == 0) {
        return call.text_result(text);
    }
    let Some(replacement) = call.text(2) else { return };
    let limit = call.limit(ffi::SQLITE_LIMIT_LENGTH);
    let mut out = Vec::with_capacity(text.len());
    let mut from = 0;
    for at in memmem::find_iter(text, pattern) {
        out.extend_from_slice(&text[from..at]);
        out.extend_from_slice(replacement);
        from = at + pattern.len();
        if out.len() as u64 > limit {
            return unsafe { ffi::sqlite3_result_error_toobig(ctx) };
        }
    }
    out.extend_from_slice(&text[from..]);
    call.text_result(&out)
}

const LEFT: u8 = 1;
const RIGHT: u8 = 2;

unsafe extern "C" fn trim_both(ctx: *mut ffi::sqlite3_context, argc: c_int, args: *mut *mut ffi::sqlite3_value) {
    trim(Call { ctx, args }, argc, LEFT | RIGHT)
}

unsafe extern "C" fn trim_left(ctx: *mut ffi::sqlite3_context, argc: c_int, args: *mut *mut ffi::sqlite3_value) {
    trim(Call { ctx, args }, argc, LEFT)
}

unsafe extern "C" fn trim_right(ctx: *mut ffi::sqlite3_context, argc: c_int, args: *mut *mut ffi::sqlite3_value) {
    trim(Call { ctx, args }, argc, RIGHT)
}

/// `trim(X[, Y])`: `X` without the characters of `Y` (a space without `Y`) at its ends. Like
/// SQLite, each step takes the first character of the set that matches the end's bytes.
fn trim(call: Call, argc: c_int, sides: u8) {
    if call.is_null(0) {
        return;
    }
    let Some(text) = call.text(0) else { return call.out_of_memory() };
    let set = if argc == 1 {
        vec![&b" "[..]]
    } else {
        let Some(chars) = call.text(1) else { return };
        characters(chars)
    };
    let (mut start, mut end) = (0, text.len());
    let mut work = 0u64;
    let mut step = |rest: &[u8], at_start: bool| -> Option<Option<usize>> {
        for c in &set {
            work += 1;
            if work % CHECK_EVERY == 0 && call.must_stop() {
                return None;
            }
            let hit = if at_start { rest.starts_with(c) } else { rest.ends_with(c) };
            if hit {
                return Some(Some(c.len()));
            }
        }
        Some(None)
    };
    if sides & LEFT != 0 {
        while start < end {
            match step(&text[start..end], true) {
                None => return,
                Some(Some(n)) => start += n,
                Some(None) => break,
            }
        }
    }
    if sides & RIGHT != 0 {
        while start < end {
            match step(&text[start..end], false) {
                None => return,
                Some(Some(n)) => end -= n,
                Some(None) => break,
            }
        }
    }
    call.text_result(&text[start..end])
}

/// The characters of a trim set as SQLite splits them: up to the first NUL, a byte from
/// `0xc0` up with every continuation byte after it, any other byte alone. Repeats are
/// dropped (the first of equal characters always matches first).
fn characters(mut s: &[u8]) -> Vec<&[u8]> {
    s = until_nul(s);
    let mut out: Vec<&[u8]> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut i = 0;
    while i < s.len() {
        let mut j = i + 1;
        if s[i] >= 0xc0 {
            while j < s.len() && is_continuation(s[j]) {
                j += 1;
            }
        }
        if seen.insert(&s[i..j]) {
            out.push(&s[i..j]);
        }
        i = j;
    }
    out
}

/// `like(P, S[, E])`, the `LIKE` operator.
unsafe extern "C" fn like(ctx: *mut ffi::sqlite3_context, argc: c_int, args: *mut *mut ffi::sqlite3_value) {
    pattern_match(Call { ctx, args }, argc, Matcher::Like)
}

/// `glob(P, S)`, the `GLOB` operator.
unsafe extern "C" fn glob(ctx: *mut ffi::sqlite3_context, argc: c_int, args: *mut *mut ffi::sqlite3_value) {
    pattern_match(Call { ctx, args }, argc, Matcher::Glob)
}

#[derive(Clone, Copy, PartialEq)]
enum Matcher {
    Like,
    Glob,
}

fn pattern_match(call: Call, argc: c_int, matcher: Matcher) {
    let pattern_bytes = unsafe { ffi::sqlite3_value_bytes(call.arg(0)) }.max(0) as u64;
    if pattern_bytes > call.limit(ffi::SQLITE_LIMIT_LIKE_PATTERN_LENGTH) {
        return call.error("LIKE or GLOB pattern too complex");
    }
    let mut escape = 0;
    if argc == 3 {
        let Some(e) = call.text(2) else { return };
        let e = until_nul(e);
        if count_chars(e) != 1 {
            return call.error("ESCAPE expression must be a single character");
        }
        escape = read_char(e);
    }
    // SQLite's matcher reads both as C strings (text values always end with a NUL).
    let (Some(pattern), Some(text)) = (call.text(0), call.text(1)) else { return };
    let work = (pattern.len() as u64 + 1).saturating_mul(text.len() as u64 + 1);
    if work > MATCH_WORK_LIMIT {
        return call.error(&format!(
            "LIKE or GLOB pattern too complex for a value this long: pattern bytes × value bytes must stay under {MATCH_WORK_LIMIT}"
        ));
    }
    if work > CHECK_EVERY && call.must_stop() {
        return;
    }
    let (pattern_c, text_c) = (pattern.as_ptr() as *const c_char, text.as_ptr() as *const c_char);
    let matched = match matcher {
        Matcher::Glob => unsafe { ffi::sqlite3_strglob(pattern_c, text_c) == 0 },
        Matcher::Like if escape == u32::from(b'%') || escape == u32::from(b'_') => {
            // SQLite's LIKE drops the wildcard its escape character names; the matcher's
            // entry point does not, so the pattern is rewritten with another escape.
            let Some((pattern, escape)) = rewrite_escape(until_nul(pattern), escape as u8) else {
                return call.error("ESCAPE '%' or '_' is not supported with a pattern that holds every ASCII control character");
            };
            unsafe { ffi::sqlite3_strlike(pattern.as_ptr(), text_c, escape) == 0 }
        }
        Matcher::Like => unsafe { ffi::sqlite3_strlike(pattern_c, text_c, escape) == 0 },
    };
    call.int(i64::from(matched))
}

/// The bytes before the first NUL: what SQLite reads of a C string.
fn until_nul(v: &[u8]) -> &[u8] {
    &v[..memchr::memchr(0, v).unwrap_or(v.len())]
}

/// `pattern` with each escape character (`wildcard`, ASCII, so never inside a multi-byte
/// character) replaced by an ASCII control character the pattern does not hold, the character
/// after each escape kept as it is.
fn rewrite_escape(pattern: &[u8], wildcard: u8) -> Option<(CString, u32)> {
    let mut present = [false; 32];
    for b in pattern.iter().filter(|b| **b < 32) {
        present[*b as usize] = true;
    }
    let stand_in = (1u8..32).find(|b| !present[*b as usize])?;
    let mut out = Vec::with_capacity(pattern.len());
    let mut bytes = pattern.iter();
    while let Some(b) = bytes.next() {
        if *b == wildcard {
            out.push(stand_in);
            out.extend(bytes.next());
        } else {
            out.push(*b);
        }
    }
    Some((CString::new(out).ok()?, u32::from(stand_in)))
}

/// Characters as SQLite counts them: a byte from `0xc0` up takes the continuation bytes after
/// it, any other byte is one character.
fn count_chars(s: &[u8]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < s.len() {
        i += 1;
        if s[i - 1] >= 0xc0 {
            while i < s.len() && is_continuation(s[i]) {
                i += 1;
            }
        }
        n += 1;
    }
    n
}

/// The first character's code point as SQLite decodes it (invalid forms become U+FFFD).
fn read_char(s: &[u8]) -> u32 {
    let first = u32::from(s[0]);
    if first < 0xc0 {
        return first;
    }
    let mut c = match first {
        0xc0..=0xdf => first - 0xc0,
        0xe0..=0xef => first - 0xe0,
        0xf0..=0xf7 => first - 0xf0,
        0xf8..=0xfb => first - 0xf8,
        0xfc..=0xfd => first - 0xfc,
        _ => 0,
    };
    for b in s[1..].iter().take_while(|b| is_continuation(**b)) {
        c = (c << 6).wrapping_add(u32::from(b & 0x3f));
    }
    if c < 0x80 || c & 0xFFFF_F800 == 0xD800 || c & 0xFFFF_FFFE == 0xFFFE {
        0xFFFD
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Every replacement answers as the engine's built-in function on values chosen for their
    /// edges: NULL, numbers, blobs, empty and NUL-holding text, invalid UTF-8, wildcards.
    #[test]
    fn replacements_answer_as_the_builtins() {
        let builtin = rusqlite::Connection::open_in_memory().unwrap();
        let bounded = rusqlite::Connection::open_in_memory().unwrap();
        install(&bounded, &Arc::new(Interrupt::new(Arc::new(AtomicBool::new(false))))).unwrap();
        let values = [
            "NULL",
            "1",
            "2.5",
            "''",
            "'abc'",
            "'aXbXc'",
            "'bXb'",
            "'X'",
            "'héllo wörld'",
            "'é'",
            "'ö'",
            "x'00ff'",
            "x'616263'",
            "x'62'",
            "CAST(x'c3' AS TEXT)",
            "CAST(x'80c3a9' AS TEXT)",
            "CAST(x'c3a9a9' AS TEXT)",
            "CAST(x'80' AS TEXT)",
            "'a%b_c'",
            "'%'",
            "'_'",
            "'%b%'",
            "'a_c'",
            "'[a]'",
            "'[^a]*'",
            "'*b*'",
            "'?b?'",
            "' pad '",
            "'a' || char(0) || 'b'",
            "char(0) || 'b'",
            "'ABC'",
            "'A%'",
            "'%%'",
            "'__'",
            "'a%%b'",
            "'%_'",
            "'\\%'",
            "'x%y_z'",
        ];
        let escapes = ["'%'", "'_'", "'\\'", "'é'", "'x'", "''", "'ab'", "NULL"];
        let eval = |conn: &rusqlite::Connection, sql: &str| -> String {
            match conn
                .query_row(&format!("SELECT quote({sql}), typeof({sql})"), [], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            {
                Ok((v, t)) => format!("{v} ({t})"),
                Err(e) => format!("error: {e}"),
            }
        };
        let mut checked = 0;
        for a in values {
            let mut exprs = vec![format!("trim({a})")];
            for b in values {
                exprs.extend([
                    format!("instr({a}, {b})"),
                    format!("trim({a}, {b})"),
                    format!("{a} LIKE {b}"),
                    format!("{a} GLOB {b}"),
                    format!("like({b}, {a})"),
                ]);
                for c in ["'Z'", "''", "'yy'", "NULL", "7"] {
                    exprs.push(format!("replace({a}, {b}, {c})"));
                }
                for e in escapes {
                    exprs.push(format!("{a} LIKE {b} ESCAPE {e}"));
                }
            }
            for sql in exprs {
                assert_eq!(eval(&bounded, &sql), eval(&builtin, &sql), "{sql}");
                checked += 1;
            }
        }
        assert!(checked > 10_000);
    }

    #[test]
    fn ltrim_and_rtrim_trim_one_side() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        install(&conn, &Arc::new(Interrupt::new(Arc::new(AtomicBool::new(false))))).unwrap();
        let row = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, Option<String>>(0)).unwrap();
        assert_eq!(row("SELECT ltrim('  a  ')").as_deref(), Some("a  "));
        assert_eq!(row("SELECT rtrim('  a  ')").as_deref(), Some("  a"));
        assert_eq!(row("SELECT ltrim('xyxaxy', 'yx')").as_deref(), Some("axy"));
        assert_eq!(row("SELECT rtrim('éaéé', 'é')").as_deref(), Some("éa"));
        assert_eq!(row("SELECT rtrim(NULL, 'x')"), None);
        assert_eq!(row("SELECT ltrim('x', NULL)"), None);
    }

    /// Crafted inputs that keep the built-ins busy for minutes take the replacements
    /// milliseconds, or are refused.
    #[test]
    fn crafted_inputs_are_cheap_or_refused() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        install(&conn, &Arc::new(Interrupt::new(Arc::new(AtomicBool::new(false))))).unwrap();
        let a = |n: usize| format!("replace(hex(zeroblob({})), '0', 'a')", n / 2);
        let int = |sql: String| conn.query_row(&sql, [], |r| r.get::<_, i64>(0));
        assert_eq!(int(format!("SELECT instr({}, {} || 'b')", a(4_000_000), a(2_000_000))).unwrap(), 0);
        assert_eq!(int(format!("SELECT instr({} || 'b', {} || 'b')", a(4_000_000), a(2_000_000))).unwrap(), 2_000_001);
        assert_eq!(int(format!("SELECT length(replace({}, {} || 'b', 'c'))", a(4_000_000), a(2_000_000))).unwrap(), 4_000_000);
        let refused = int(format!("SELECT {} LIKE ('%' || {} || 'b')", a(4_000_000), a(40_000))).unwrap_err();
        assert!(refused.to_string().contains("too complex for a value this long"), "{refused}");
        // A set of many distinct characters: every step compares against each of them.
        let set =
            "(WITH RECURSIVE c(n) AS (SELECT 256 UNION ALL SELECT n + 1 FROM c WHERE n < 20000) SELECT group_concat(char(n), '') FROM c)";
        assert_eq!(int(format!("SELECT length(trim({}, {set} || 'b'))", a(1_000))).unwrap(), 1_000);
    }

    /// A long trim stops with `SQLITE_INTERRUPT` once its statement must stop.
    #[test]
    fn a_long_trim_stops_with_its_statement() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let interrupt = Arc::new(Interrupt::new(Arc::new(AtomicBool::new(false))));
        install(&conn, &interrupt).unwrap();
        interrupt.start_statement(Some(std::time::Duration::ZERO));
        let set =
            "(WITH RECURSIVE c(n) AS (SELECT 256 UNION ALL SELECT n + 1 FROM c WHERE n < 60000) SELECT group_concat(char(n), '') FROM c)";
        let sql = format!("SELECT length(trim(replace(hex(zeroblob(2000000)), '0', 'b'), {set} || 'b'))");
        let err = conn.query_row(&sql, [], |r| r.get::<_, i64>(0)).unwrap_err();
        assert_eq!(err.sqlite_error_code(), Some(rusqlite::ErrorCode::OperationInterrupted), "{err}");
        interrupt.end_statement();
        assert_eq!(conn.query_row("SELECT trim('xax', 'x')", [], |r| r.get::<_, String>(0)).unwrap(), "a");
    }
}
