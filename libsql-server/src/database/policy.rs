//! What client SQL may do on a server connection, decided by SQLite's authorizer: an
//! allow-list of actions, so a form nobody thought of is refused rather than let through.
//!
//! - No statement opens a file: `ATTACH` is refused whatever its filename is (SQLite hands the
//!   authorizer no name when the filename is an expression, a bound parameter or a
//!   subquery). The one exception is the nameless temporary database `VACUUM` attaches while
//!   it runs (at step time, never at prepare time, where every client `ATTACH` is seen).
//! - No statement changes process-wide state or the server's settings: a PRAGMA is allowed
//!   only from the list below; setting one that is not a plain query, a setting stored in the
//!   database file, or a per-connection preference is refused.
//! - No write commits without the namespace's write gate (a commit hook turns it into a
//!   rollback), and a statement that writes behind a read-only face (`PRAGMA optimize`) is
//!   marked so that it takes the gate first.
//! - A statement that changes the connection's own state (a per-connection PRAGMA, a
//!   temporary table, trigger or view) *taints* the connection: it is closed when its stream
//!   ends instead of going back to the pool, so the next user gets a connection in the
//!   server's known state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use libsql_sys::rusqlite::hooks::{AuthAction, AuthContext, Authorization};

/// Flags the authorizer reads and writes, shared with the connection that owns it.
#[derive(Default)]
pub struct PolicyState {
    /// Raised while the server itself applies its settings (guarded PRAGMAs).
    pub internal: AtomicBool,
    /// Raised while a statement is being stepped: `VACUUM` prepares its own statements then.
    pub stepping: AtomicBool,
    /// Set once client SQL changed this connection's state; never lowered.
    pub tainted: AtomicBool,
    /// Set when a statement being prepared writes although SQLite reports it read-only
    /// (`PRAGMA optimize` runs an `ANALYZE` inside): it must take the write gate.
    pub wants_gate: AtomicBool,
    /// Set when a statement being prepared begins, ends or marks a transaction (`BEGIN`,
    /// `COMMIT`, `SAVEPOINT`...): a replica sends those to its primary.
    pub transaction_control: AtomicBool,
    /// Whether the connection holds its namespace's write gate: a commit without it is
    /// turned into a rollback (the commit hook), whatever path the write took.
    pub holds_gate: AtomicBool,
}

/// How a PRAGMA may be used by client SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PragmaUse {
    /// A query or an action on this database only; its argument (a table name, a mode) is free.
    Query,
    /// A value stored in the database file: written through the log like any other change.
    Stored,
    /// A preference of this connection: allowed, and the connection is not reused.
    Connection,
    /// The page cache's size: a connection preference, up to [`MAX_CACHE_BYTES`].
    CacheSize,
    /// May be read; setting it would reach beyond the client's own connection and data
    /// (process-wide limits and directories, durability, the log's format, memory).
    ReadOnly,
}

/// Every PRAGMA client SQL may name. Anything else (`key`, `rekey`, an unknown name) is
/// refused outright.
const PRAGMAS: &[(&str, PragmaUse)] = {
    use PragmaUse::*;
    &[
        ("analysis_limit", Connection),
        ("application_id", Stored),
        ("auto_vacuum", Stored),
        ("automatic_index", Connection),
        ("busy_timeout", ReadOnly),
        ("cache_size", CacheSize),
        ("cache_spill", Connection),
        ("case_sensitive_like", ReadOnly),
        ("cell_size_check", Connection),
        ("checkpoint_fullfsync", ReadOnly),
        ("collation_list", Query),
        ("compile_options", Query),
        ("count_changes", Connection),
        ("data_store_directory", ReadOnly),
        ("data_version", Query),
        ("database_list", Query),
        ("default_cache_size", ReadOnly),
        ("defer_foreign_keys", Connection),
        ("empty_result_callbacks", Connection),
        ("encoding", Stored),
        ("foreign_key_check", Query),
        ("foreign_key_list", Query),
        ("foreign_keys", Connection),
        ("freelist_count", Query),
        ("full_column_names", Connection),
        ("fullfsync", ReadOnly),
        ("function_list", Query),
        ("hard_heap_limit", ReadOnly),
        ("ignore_check_constraints", Connection),
        ("incremental_vacuum", Query),
        ("index_info", Query),
        ("index_list", Query),
        ("index_xinfo", Query),
        ("integrity_check", Query),
        ("journal_mode", ReadOnly),
        ("journal_size_limit", ReadOnly),
        ("legacy_alter_table", Connection),
        ("legacy_file_format", Connection),
        ("locking_mode", ReadOnly),
        ("max_page_count", ReadOnly),
        ("mmap_size", ReadOnly),
        ("module_list", Query),
        ("optimize", Query),
        ("page_count", Query),
        ("page_size", ReadOnly),
        ("pragma_list", Query),
        ("query_only", Connection),
        ("quick_check", Query),
        ("read_uncommitted", Connection),
        ("recursive_triggers", Connection),
        ("reverse_unordered_selects", Connection),
        ("schema_version", ReadOnly),
        ("secure_delete", Connection),
        ("short_column_names", Connection),
        ("shrink_memory", Query),
        ("soft_heap_limit", ReadOnly),
        ("stats", Query),
        ("synchronous", ReadOnly),
        ("table_info", Query),
        ("table_list", Query),
        ("table_xinfo", Query),
        ("temp_store", ReadOnly),
        ("temp_store_directory", ReadOnly),
        ("threads", ReadOnly),
        ("trusted_schema", ReadOnly),
        ("user_version", Stored),
        ("wal_autocheckpoint", ReadOnly),
        ("wal_checkpoint", Query),
        ("writable_schema", ReadOnly),
    ]
};

/// The largest page cache a client may ask for (SQLite's default is 2 MiB).
const MAX_CACHE_BYTES: i64 = 8 << 20;

/// Whether `PRAGMA cache_size = value` stays within [`MAX_CACHE_BYTES`]: a positive value
/// counts pages, a negative one KiB.
fn cache_size_allowed(value: &str) -> bool {
    match value.trim().parse::<i64>() {
        Ok(pages) if pages >= 0 => pages.saturating_mul(super::PAGE_SIZE as i64) <= MAX_CACHE_BYTES,
        Ok(kib) => kib.saturating_neg().saturating_mul(1024) <= MAX_CACHE_BYTES,
        Err(_) => false,
    }
}

fn pragma_use(name: &str) -> Option<PragmaUse> {
    PRAGMAS.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, u)| *u)
}

/// Functions client SQL may not call even if the engine has them: extension loading;
/// sqlean's edit distances, whose one call is quadratic in time (no time limit can stop it
/// midway) and, for two of them, in memory (allocated outside SQLite, unchecked); sqlean's
/// text functions that build a result sized by an argument or a product of their inputs with
/// the C allocator, before SQLite's length limit can refuse it; and sqlean's text searches
/// and trims, which compare at every position (minutes in one call on long values). SQLite's
/// own `instr`, `replace`, `trim` and `LIKE` do the same work boundedly (`functions`).
const DENIED_FUNCTIONS: &[&str] = &[
    "load_extension",
    "fts3_tokenizer",
    "repeat",
    "text_repeat",
    "lpad",
    "text_lpad",
    "rpad",
    "text_rpad",
    "text_replace",
    "dlevenshtein",
    "fuzzy_damlev",
    "osa_distance",
    "fuzzy_osadist",
    "levenshtein",
    "fuzzy_leven",
    "edit_distance",
    "fuzzy_editdist",
    "jaro_winkler",
    "fuzzy_jarowin",
    "text_index",
    "strpos",
    "text_last_index",
    "text_contains",
    "text_count",
    "text_like",
    "text_split",
    "split_part",
    "text_translate",
    "translate",
    "text_trim",
    "text_ltrim",
    "text_rtrim",
    "btrim",
];

/// The authorizer's decision for one action.
pub fn authorize(state: &PolicyState, ctx: &AuthContext<'_>) -> Authorization {
    use AuthAction as A;
    let taint = || {
        state.tainted.store(true, Ordering::Relaxed);
        Authorization::Allow
    };
    match ctx.action {
        A::Select | A::Read { .. } | A::Insert { .. } | A::Update { .. } | A::Delete { .. } => Authorization::Allow,
        A::Transaction { .. } | A::Savepoint { .. } => {
            state.transaction_control.store(true, Ordering::Relaxed);
            Authorization::Allow
        }
        A::Recursive => Authorization::Allow,
        A::CreateTable { .. } | A::CreateIndex { .. } | A::CreateTrigger { .. } | A::CreateView { .. } => Authorization::Allow,
        A::DropTable { .. } | A::DropIndex { .. } | A::DropTrigger { .. } | A::DropView { .. } => Authorization::Allow,
        A::AlterTable { .. } | A::Reindex { .. } | A::Analyze { .. } => Authorization::Allow,
        A::CreateVtable { .. } | A::DropVtable { .. } if ctx.database_name != Some("temp") => Authorization::Allow,
        A::CreateVtable { .. } | A::DropVtable { .. } => taint(),
        A::CreateTempTable { .. } | A::CreateTempIndex { .. } | A::CreateTempTrigger { .. } | A::CreateTempView { .. } => taint(),
        A::DropTempTable { .. } | A::DropTempIndex { .. } | A::DropTempTrigger { .. } | A::DropTempView { .. } => taint(),
        A::Function { function_name } => {
            if DENIED_FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(function_name)) {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        // VACUUM's scratch database: nameless, attached and detached by the engine while the
        // VACUUM statement runs. Client ATTACH is always seen at prepare time.
        A::Attach { filename: "" } if state.stepping.load(Ordering::Relaxed) => Authorization::Allow,
        A::Detach { .. } => Authorization::Allow,
        A::Pragma { pragma_name, pragma_value } => {
            if state.internal.load(Ordering::Relaxed) {
                return Authorization::Allow;
            }
            if pragma_name.eq_ignore_ascii_case("optimize") {
                // Prepared at step time (the `pragma_optimize` table), it comes too late to
                // take the write gate first: refused there.
                if state.stepping.load(Ordering::Relaxed) {
                    return Authorization::Deny;
                }
                state.wants_gate.store(true, Ordering::Relaxed);
            }
            match (pragma_use(pragma_name), pragma_value) {
                (None, _) => Authorization::Deny,
                (Some(PragmaUse::Query | PragmaUse::Stored), _) | (Some(_), None) => Authorization::Allow,
                (Some(PragmaUse::Connection), Some(_)) => taint(),
                (Some(PragmaUse::CacheSize), Some(value)) if cache_size_allowed(value) => taint(),
                (Some(PragmaUse::CacheSize), Some(_)) => Authorization::Deny,
                (Some(PragmaUse::ReadOnly), Some(_)) => Authorization::Deny,
            }
        }
        // ATTACH of any file, and any action this list does not know.
        _ => Authorization::Deny,
    }
}

/// A shared state and the authorizer closure over it, as the connection installs it.
pub fn authorizer(
    state: Arc<PolicyState>,
) -> impl for<'r> FnMut(AuthContext<'r>) -> Authorization + Send + std::panic::RefUnwindSafe + 'static {
    move |ctx| authorize(&state, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma<'a>(name: &'a str, value: Option<&'a str>) -> AuthContext<'a> {
        AuthContext { action: AuthAction::Pragma { pragma_name: name, pragma_value: value }, database_name: None, accessor: None }
    }

    #[test]
    fn pragmas_are_sorted_and_unique() {
        for pair in PRAGMAS.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} before {}", pair[0].0, pair[1].0);
        }
    }

    #[test]
    fn pragma_rules() {
        let state = PolicyState::default();
        assert_eq!(authorize(&state, &pragma("hard_heap_limit", Some("1"))), Authorization::Deny);
        assert_eq!(authorize(&state, &pragma("HARD_HEAP_LIMIT", None)), Authorization::Allow);
        assert_eq!(authorize(&state, &pragma("table_info", Some("t"))), Authorization::Allow);
        assert_eq!(authorize(&state, &pragma("no_such_pragma", None)), Authorization::Deny);
        assert!(!state.tainted.load(Ordering::Relaxed));
        assert_eq!(authorize(&state, &pragma("cache_size", Some("-100000000"))), Authorization::Deny);
        assert_eq!(authorize(&state, &pragma("cache_size", Some("1000000"))), Authorization::Deny);
        assert!(!state.tainted.load(Ordering::Relaxed));
        assert_eq!(authorize(&state, &pragma("query_only", Some("1"))), Authorization::Allow);
        assert!(state.tainted.load(Ordering::Relaxed));
        assert_eq!(authorize(&state, &pragma("cache_size", Some("-2000"))), Authorization::Allow);
        assert_eq!(authorize(&state, &pragma("cache_size", Some("5"))), Authorization::Allow);
        state.internal.store(true, Ordering::Relaxed);
        assert_eq!(authorize(&state, &pragma("synchronous", Some("OFF"))), Authorization::Allow);
    }

    #[test]
    fn attach_only_as_vacuum_scratch() {
        let state = PolicyState::default();
        let attach = |filename| AuthContext { action: AuthAction::Attach { filename }, database_name: None, accessor: None };
        let computed =
            AuthContext { action: AuthAction::Unknown { code: 24, arg1: None, arg2: None }, database_name: None, accessor: None };
        assert_eq!(authorize(&state, &attach("")), Authorization::Deny);
        assert_eq!(authorize(&state, &computed), Authorization::Deny);
        state.stepping.store(true, Ordering::Relaxed);
        assert_eq!(authorize(&state, &attach("")), Authorization::Allow);
        assert_eq!(authorize(&state, &attach("/elsewhere")), Authorization::Deny);
        assert_eq!(authorize(&state, &computed), Authorization::Deny);
    }
}
