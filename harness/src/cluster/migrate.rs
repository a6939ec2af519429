//! Live slot migration (`move_slot`, `reshard`): MIGRATING / IMPORTING, MIGRATE in batches,
//! then SETSLOT NODE on every master.

use std::thread;
use std::time::Duration;

use super::*;

/// Connections to the masters involved in a migration, kept across the slots of a reshard.
pub(super) struct SlotMover<'a> {
    cluster: &'a RedisCluster,
    from_port: u16,
    to_port: u16,
    from_id: String,
    to_id: String,
    from: redis::Connection,
    to: redis::Connection,
    /// Every other live master.
    others: Vec<(u16, redis::Connection)>,
}

impl<'a> SlotMover<'a> {
    pub(super) fn new(cluster: &'a RedisCluster, from_port: u16, to_port: u16) -> SlotMover<'a> {
        assert_ne!(from_port, to_port, "moving slots from a node to itself");
        let from_id = cluster.node_id(from_port);
        let to_id = cluster.node_id(to_port);
        let others = cluster
            .masters()
            .into_iter()
            .map(|(_, port, _)| port)
            .filter(|p| *p != from_port && *p != to_port)
            .map(|p| (p, cluster.conn(p)))
            .collect();
        SlotMover {
            cluster,
            from_port,
            to_port,
            from_id,
            to_id,
            from: cluster.conn(from_port),
            to: cluster.conn(to_port),
            others,
        }
    }

    fn fail(&self, slot: u16, why: String) -> ! {
        self.cluster.fail(&format!(
            "moving slot {slot} from :{} to :{}: {why}",
            self.from_port, self.to_port
        ))
    }

    pub(super) fn move_slot(&mut self, slot: u16) {
        let (from_port, to_port) = (self.from_port, self.to_port);
        if let Err(e) = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&self.from_id)
            .query::<()>(&mut self.to)
        {
            self.fail(slot, format!("SETSLOT IMPORTING on :{to_port}: {e}"));
        }
        if let Err(e) = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&self.to_id)
            .query::<()>(&mut self.from)
        {
            self.fail(slot, format!("SETSLOT MIGRATING on :{from_port}: {e}"));
        }
        let mut io_errors = 0;
        loop {
            let keys: Vec<Vec<u8>> = match redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(MIGRATE_BATCH)
                .query(&mut self.from)
            {
                Ok(keys) => keys,
                Err(e) => self.fail(slot, format!("GETKEYSINSLOT on :{from_port}: {e}")),
            };
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to_port)
                .arg("")
                .arg(0)
                .arg(5000);
            if let Some(p) = self.cluster.node(to_port).password() {
                migrate.arg("AUTH").arg(p);
            }
            migrate.arg("KEYS");
            for k in &keys {
                migrate.arg(k.as_slice());
            }
            match migrate.query::<String>(&mut self.from) {
                // NOKEY: the keys were deleted meanwhile.
                Ok(_) => {}
                Err(e) if e.code() == Some("IOERR") && io_errors < 5 => {
                    io_errors += 1;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => self.fail(slot, format!("MIGRATE of {} keys: {e}", keys.len())),
            }
        }
        // The target first (it bumps its config epoch), then the source, then the others.
        let mut targets: Vec<(u16, &mut redis::Connection)> =
            vec![(to_port, &mut self.to), (from_port, &mut self.from)];
        targets.extend(self.others.iter_mut().map(|(p, c)| (*p, c)));
        let mut failures = Vec::new();
        for (port, conn) in targets {
            if let Err(e) = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&self.to_id)
                .query::<()>(conn)
            {
                failures.push(format!("SETSLOT NODE on :{port}: {e}"));
            }
        }
        if !failures.is_empty() {
            self.fail(slot, failures.join("; "));
        }
    }
}
