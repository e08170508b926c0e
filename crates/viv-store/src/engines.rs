//! Test fixture: the store's tests run against both engines. [`each_engine`] hands a test a
//! fresh SQLite file and then a fresh PostgreSQL database (on the test process's server, see
//! `viv-test-postgres`), so the two engines pass one suite.

use super::Store;

/// Runs `test` against a fresh store of each engine, naming the engine if it fails.
pub(crate) fn each_engine(test: impl Fn(&Store)) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sqlite = Store::open(&dir.path().join("viv.db")).expect("an SQLite store");
    run_named("sqlite", || test(&sqlite));
    let postgres = fresh_postgres();
    run_named("postgres", || test(&postgres));
}

fn run_named(engine: &str, test: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(test)) {
        eprintln!("the store test above failed on {engine}");
        std::panic::resume_unwind(panic);
    }
}

/// A store on a new, empty database of this process's PostgreSQL server.
pub(crate) fn fresh_postgres() -> Store {
    Store::connect_postgres(&viv_test_postgres::fresh_database()).expect("a PostgreSQL store")
}

/// Runs `test` against two stores (two servers' connections) on one fresh database of each
/// engine, naming the engine if it fails.
pub(crate) fn each_engine_shared(test: impl Fn(&Store, &Store)) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("viv.db");
    let (one, two) = (
        Store::open(&path).expect("an SQLite store"),
        Store::open(&path).expect("a second connection"),
    );
    run_named("sqlite", || test(&one, &two));
    let url = viv_test_postgres::fresh_database();
    let (one, two) = (
        Store::connect_postgres(&url).expect("a PostgreSQL store"),
        Store::connect_postgres(&url).expect("a second connection"),
    );
    run_named("postgres", || test(&one, &two));
}
