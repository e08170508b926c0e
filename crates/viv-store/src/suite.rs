//! The store's shared suite: each test runs on SQLite and on PostgreSQL ([`each_engine`]), so
//! the two engines keep one behaviour. The tests of single tables live beside them (`lifecycle`,
//! `volumes`, …) and run on both engines the same way.

use viv_api::SandboxState;

use super::engines::{each_engine, fresh_postgres};
use super::testing::sandbox;
use super::*;

pub(super) fn snapshot_node(id: &str, parent: Option<&str>, sandbox_id: &str, kind: SnapshotKind) -> SnapshotRow {
    SnapshotRow {
        id: id.into(),
        parent_id: parent.map(Into::into),
        sandbox_id: sandbox_id.into(),
        template_id: "base".into(),
        kind,
        name: None,
        cpu_count: 1,
        memory_mb: 512,
        bytes: 5 << 30,
        created_at: now_rfc3339(),
        guest_token: Some("g".into()),
        network: Some("isolated".into()),
        memory: Some("whole".into()),
    }
}

fn template(name: &str, build_ms: u64) -> TemplateRow {
    TemplateRow {
        name: name.into(),
        from: "base".into(),
        layer: format!("/layers/{name}"),
        config: viv_template::ImageConfig::default(),
        start: None,
        ready: None,
        cpu_count: 1,
        memory_mb: 256,
        spec: "FROM base\nRUN true\n".into(),
        layers: vec!["a".into(), "b".into()],
        created_at: now_rfc3339(),
        build_ms,
    }
}

#[test]
fn api_keys_are_kept_hashed_listed_and_revoked() {
    each_engine(|store| {
        let info = store.insert_key("k1", "ci", "e2b_0123456789abcdef").unwrap();
        assert_eq!(info.prefix, "e2b_012345");
        assert!(store.key_is_valid("e2b_0123456789abcdef").unwrap());
        assert!(!store.key_is_valid("e2b_other").unwrap());
        let stored = store
            .conn()
            .query_map("SELECT key_sha256 FROM api_keys", params![], |r| r.get::<String>(0))
            .unwrap();
        assert_eq!(stored, vec![hash_key("e2b_0123456789abcdef")]);
        assert_eq!(store.list_keys().unwrap().len(), 1);
        assert!(store.revoke_key("e2b_012345").unwrap(), "by prefix");
        assert!(!store.revoke_key("k1").unwrap(), "already revoked");
        assert!(!store.key_is_valid("e2b_0123456789abcdef").unwrap());
        assert!(store.list_keys().unwrap().is_empty());
    });
}

#[test]
fn a_sandbox_row_round_trips_and_is_replaced_whole() {
    each_engine(|store| {
        let row = sandbox("s1");
        store.put_sandbox(&row).unwrap();
        let back = store.sandbox("s1").unwrap().unwrap();
        assert_eq!(back.metadata, row.metadata);
        assert_eq!(back.vmm, row.vmm);
        assert_eq!((back.net_slot, back.auto_pause, back.cpu_count), (Some(3), true, 2));
        assert_eq!(back.network.deny_out, vec!["0.0.0.0/0".to_owned()]);
        assert_eq!(back.end_at_ms, 1_900_000_000_000);

        let mut paused = row.clone();
        paused.state = SandboxState::Paused;
        paused.vmm = None;
        paused.net_slot = None;
        store.put_sandbox(&paused).unwrap();
        let back = store.sandbox("s1").unwrap().unwrap();
        assert_eq!(
            (back.state, back.vmm, back.net_slot),
            (SandboxState::Paused, None, None)
        );

        store.set_end("s1", 5).unwrap();
        store.fail_sandbox("s1", "QEMU exited").unwrap();
        let back = store.sandbox("s1").unwrap().unwrap();
        assert_eq!(
            (back.state, back.error.as_deref(), back.end_at_ms),
            (SandboxState::Failed, Some("QEMU exited"), 5)
        );
        assert_eq!(store.sandboxes().unwrap().len(), 1);
        assert!(store.sandbox("nope").unwrap().is_none());
    });
}

#[test]
fn deleting_a_sandbox_takes_its_owner_and_traffic_token() {
    each_engine(|store| {
        store.put_sandbox(&sandbox("s1")).unwrap();
        store.set_sandbox_owner("s1", "k1").unwrap();
        store.set_traffic_token("s1", "tok").unwrap();
        store.delete_sandbox("s1").unwrap();
        assert!(store.sandbox("s1").unwrap().is_none());
        assert_eq!(store.sandbox_owner("s1").unwrap(), None);
        assert_eq!(store.traffic_token("s1").unwrap(), None);
    });
}

#[test]
fn the_snapshot_tree_records_parents_users_and_deletions() {
    each_engine(|store| {
        store.put_sandbox(&sandbox("s1")).unwrap();
        store
            .put_snapshot(&snapshot_node("n1", None, "s1", SnapshotKind::Pause))
            .unwrap();
        assert_eq!(store.sandbox("s1").unwrap().unwrap().snapshot_id.as_deref(), Some("n1"));
        let mut named = snapshot_node("n2", Some("n1"), "s1", SnapshotKind::Snapshot);
        named.name = Some("release".into());
        store.put_snapshot(&named).unwrap();
        assert_eq!(store.snapshot("release:default").unwrap().unwrap().id, "n2");
        assert_eq!(store.snapshot("n1").unwrap().unwrap().bytes, 5 << 30);
        assert_eq!(store.snapshot_users("n1").unwrap(), (vec!["n2".to_owned()], vec![]));
        assert_eq!(store.snapshot_users("n2").unwrap(), (vec![], vec!["s1".to_owned()]));
        // A node's parent must exist.
        assert!(store
            .put_snapshot(&snapshot_node("n3", Some("missing"), "s1", SnapshotKind::Fork))
            .is_err());
        assert!(
            store.snapshot("n3").unwrap().is_none(),
            "the failed transaction left nothing"
        );
        assert_eq!(store.sandbox("s1").unwrap().unwrap().snapshot_id.as_deref(), Some("n2"));

        // A node folded into its child: the child takes its parent and a new size.
        store.reparent_snapshot("n2", None, 9).unwrap();
        let child = store.snapshot("n2").unwrap().unwrap();
        assert_eq!((child.parent_id, child.bytes), (None, 9));
        assert_eq!(store.snapshot_users("n1").unwrap(), (vec![], vec![]));
        store.reparent_snapshot("n2", Some("n1"), 9).unwrap();
        assert_eq!(store.snapshot_users("n1").unwrap(), (vec!["n2".to_owned()], vec![]));

        store.set_snapshot_diffed("n2", 7).unwrap();
        store.demote_snapshot("n2").unwrap();
        let demoted = store.snapshot("n2").unwrap().unwrap();
        assert_eq!(
            (demoted.kind, demoted.name, demoted.bytes, demoted.memory.as_deref()),
            (SnapshotKind::Fork, None, 7, Some("diff"))
        );
        store.delete_snapshot("n2").unwrap();
        assert_eq!(store.sandbox("s1").unwrap().unwrap().snapshot_id, None);
        assert_eq!(store.snapshots().unwrap().len(), 1);
    });
}

#[test]
fn templates_builds_versions_and_tags() {
    each_engine(|store| {
        store.put_template(&template("app", 10)).unwrap();
        store.put_template(&template("app", 20)).unwrap();
        assert_eq!(store.templates().unwrap().len(), 1);
        let back = store.template("app").unwrap().unwrap();
        assert_eq!((back.build_ms, back.layers.len()), (20, 2));
        store.put_template_build("app", "b1").unwrap();
        store.put_template_build("app", "b2").unwrap();
        assert_eq!(store.template_build("app").unwrap().as_deref(), Some("b2"));

        let version = |id: &str, parent: Option<&str>| VersionRow {
            id: id.into(),
            template: "app".into(),
            parent: parent.map(Into::into),
            created_at: now_rfc3339_ms(),
        };
        store
            .put_version(&template("app-1", 1), &version("app-1", None))
            .unwrap();
        store
            .put_version(&template("app-2", 1), &version("app-2", Some("app-1")))
            .unwrap();
        // The same version again changes nothing.
        store
            .put_version(&template("app-2", 1), &version("app-2", None))
            .unwrap();
        assert_eq!(
            store.version("app-2").unwrap().unwrap().parent.as_deref(),
            Some("app-1")
        );
        assert_eq!(store.versions("app").unwrap().len(), 2);
        store.put_tag("app", "default", "app-1").unwrap();
        store.put_tag("app", "default", "app-2").unwrap();
        store.put_tag("app", "beta", "app-1").unwrap();
        assert_eq!(store.tag("app", "default").unwrap().as_deref(), Some("app-2"));
        assert_eq!(store.tags("app").unwrap().len(), 2);
        store.delete_tag("app", "beta").unwrap();
        store.delete_version("app-1").unwrap();
        assert!(store.template("app-1").unwrap().is_none());
        assert_eq!(store.version_ids().unwrap(), vec!["app-2".to_owned()]);
        store.delete_template("app").unwrap();
        assert_eq!(store.template_build("app").unwrap(), None);
    });
}

#[test]
fn vms_their_snapshots_and_backups() {
    each_engine(|store| {
        assert!(store.insert_vm("v1", "web", "{}", "stopped").unwrap());
        assert!(
            !store.insert_vm("v2", "web", "{}", "stopped").unwrap(),
            "names are unique"
        );
        assert!(store.insert_vm("v2", "db", "{}", "stopped").unwrap());
        assert_eq!(store.rename_vm("v2", "web").unwrap(), Some(false));
        assert_eq!(store.rename_vm("v2", "db2").unwrap(), Some(true));
        assert_eq!(store.rename_vm("gone", "x").unwrap(), None);
        let process = viv_vmm::ProcessIdentity {
            pid: 77,
            start_time: 1 << 40,
        };
        assert!(store.set_vm_started("v1", "{\"a\":1}", "running", process).unwrap());
        let vm = store.vm("web").unwrap().unwrap();
        assert_eq!((vm.state.as_str(), vm.starts), ("running", 1));
        assert!(store.set_vm_exited("v1", "stopped", "ACPI shutdown").unwrap());
        assert_eq!(store.list_vms().unwrap().len(), 2);

        let snap = |id: &str, name: &str, parent: Option<&str>| VmSnapshotRow {
            id: id.into(),
            vm_id: "v1".into(),
            name: name.into(),
            parent_id: parent.map(Into::into),
            memory: true,
            vm_state: "running".into(),
            definition: "{}".into(),
            description: String::new(),
            created_at: String::new(),
        };
        assert!(store.insert_vm_snapshot(&snap("a", "first", None)).unwrap());
        assert!(!store.insert_vm_snapshot(&snap("x", "first", None)).unwrap());
        assert!(store.insert_vm_snapshot(&snap("b", "second", Some("a"))).unwrap());
        assert_eq!(store.vm_current_snapshot("v1").unwrap().as_deref(), Some("b"));
        store
            .delete_vm_snapshot(&store.vm_snapshot("v1", "second").unwrap().unwrap())
            .unwrap();
        assert_eq!(store.vm_current_snapshot("v1").unwrap().as_deref(), Some("a"));

        let backup = |id: &str, parent: Option<&str>| VmBackupRow {
            id: id.into(),
            vm_id: "v1".into(),
            kind: if parent.is_some() { "incremental" } else { "full" }.into(),
            parent_id: parent.map(Into::into),
            disks: "[]".into(),
            bitmap: "bm".into(),
            live: true,
            created_at: String::new(),
        };
        let full = store.insert_vm_backup(&backup("f", None)).unwrap();
        store.insert_vm_backup(&backup("i", Some("f"))).unwrap();
        store.delete_vm_backup(&full, "full").unwrap();
        let left = store.vm_backups("v1").unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].kind.as_str(), left[0].parent_id.as_deref(), left[0].live),
            ("full", None, true)
        );
        assert!(store.delete_vm("v1").unwrap());
    });
}

#[test]
fn switches_take_the_smallest_free_index() {
    each_engine(|store| {
        assert_eq!(store.insert_switch("a", "{}").unwrap().unwrap().index, 0);
        assert_eq!(store.insert_switch("b", "{}").unwrap().unwrap().index, 1);
        assert!(store.insert_switch("a", "{}").unwrap().is_none(), "names are unique");
        assert!(store.delete_switch("a").unwrap());
        assert_eq!(store.insert_switch("c", "{}").unwrap().unwrap().index, 0);
        assert!(store.update_switch("b", "{\"x\":1}").unwrap());
        assert_eq!(store.switch("b").unwrap().unwrap().definition, "{\"x\":1}");
        assert_eq!(store.list_switches().unwrap().len(), 2);
    });
}

#[test]
fn a_write_through_one_postgres_connection_is_read_through_another_at_once() {
    let first = fresh_postgres();
    let url = first
        .postgres_url()
        .expect("a PostgreSQL store knows its URL")
        .to_owned();
    let second = Store::connect_postgres(&url).unwrap();
    first.put_sandbox(&sandbox("shared")).unwrap();
    assert_eq!(second.sandbox("shared").unwrap().unwrap().id, "shared");
    second.delete_sandbox("shared").unwrap();
    assert!(first.sandbox("shared").unwrap().is_none());
}

#[test]
fn api_servers_starting_at_once_migrate_a_new_database_once() {
    let first = fresh_postgres();
    let url = first.postgres_url().unwrap().to_owned();
    // `first` migrated its database; drop the schema so the next ones race on a fresh one.
    first
        .conn()
        .batch("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        .unwrap();
    let stores: Vec<Store> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| Store::connect_postgres(&url))).collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    stores[0].insert_key("k", "n", "e2b_racing").unwrap();
    assert!(stores[3].key_is_valid("e2b_racing").unwrap());
}

#[test]
fn a_database_newer_than_the_binary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("viv.db");
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", MIGRATIONS.len() + 1).unwrap();
    drop(conn);
    assert!(matches!(Store::open(&path), Err(StoreError::TooNew { .. })));

    let store = fresh_postgres();
    let url = store.postgres_url().unwrap().to_owned();
    store
        .conn()
        .execute(
            "UPDATE viv_schema SET version = ?1",
            params![POSTGRES_MIGRATIONS.len() + 1],
        )
        .unwrap();
    assert!(matches!(Store::connect_postgres(&url), Err(StoreError::TooNew { .. })));
}

#[test]
fn a_broken_postgres_connection_fails_one_call_as_unavailable_and_the_next_reconnects() {
    let store = fresh_postgres();
    store.insert_key("k", "n", "e2b_survives").unwrap();
    // Consecutive calls take the connections in turn: one pid each.
    let pids: std::collections::BTreeSet<i32> = (0..super::db::PG_CONNECTIONS)
        .map(|_| {
            store
                .conn()
                .query_row("SELECT pg_backend_pid()", params![], |r| r.get(0))
                .unwrap()
                .unwrap()
        })
        .collect();
    assert_eq!(pids.len(), super::db::PG_CONNECTIONS, "{pids:?}");
    let other = Store::connect_postgres(store.postgres_url().unwrap()).unwrap();
    for pid in &pids {
        other
            .conn()
            .execute("SELECT pg_terminate_backend(?1)", params![*pid])
            .unwrap();
    }
    // Each broken connection fails the one call that meets its break, as unavailable (503)…
    for _ in &pids {
        let err = store.key_is_valid("e2b_survives").unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
    // …and is replaced at its next use.
    for _ in &pids {
        assert!(store.key_is_valid("e2b_survives").unwrap(), "the next call reconnects");
    }
}
