//! Which runtime process started a module instance, so that what a crashed runtime
//! left behind can be told from what another runtime on the same host runs right now.
//!
//! An owner is a process: its PID namespace, its PID and its start time (since boot, in
//! clock ticks, from `/proc/PID/stat`), written as `NS:PID:START`. A PID alone is
//! reused; the start time makes it one process. An owner recorded in another PID
//! namespace (a runtime in another container sharing the Docker engine) cannot be
//! checked from here and is taken for alive: its instances are never touched.

use std::fmt;

/// The label (containers) and file name (process modules) that record an owner.
pub const OWNER_LABEL: &str = "io.weir.runtime";

/// A runtime process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    namespace: u64,
    pid: u32,
    started: u64,
}

impl Owner {
    /// This process; `None` where `/proc` does not say (not Linux).
    pub fn current() -> Option<Owner> {
        Owner::of_process(std::process::id())
    }

    /// Process `pid` as it is now, if it exists.
    pub fn of_process(pid: u32) -> Option<Owner> {
        Some(Owner {
            namespace: own_pid_namespace()?,
            pid,
            started: start_time(pid)?,
        })
    }

    /// Reads an owner written by [`fmt::Display`].
    pub fn parse(text: &str) -> Option<Owner> {
        let mut parts = text.trim().split(':');
        let owner = Owner {
            namespace: parts.next()?.parse().ok()?,
            pid: parts.next()?.parse().ok()?,
            started: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(owner)
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether this process is gone: its PID is free or held by a later process. Never
    /// true for an owner in another PID namespace.
    pub fn is_gone(&self) -> bool {
        if own_pid_namespace() != Some(self.namespace) {
            return false;
        }
        start_time(self.pid) != Some(self.started)
    }

    /// A short text naming this process, for instance names.
    pub fn tag(&self) -> String {
        format!("{:x}{:x}", self.pid, self.started % 0x10000)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.namespace, self.pid, self.started)
    }
}

/// The inode of this process's PID namespace.
fn own_pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .ok()
        .map(|meta| meta.ino())
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the
    // last closing one. The state is field 3; the start time is field 22.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_one_is_gone() {
        let me = Owner::current().expect("Linux has /proc");
        assert!(!me.is_gone());
        assert_eq!(Owner::parse(&me.to_string()), Some(me));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let it = Owner::of_process(pid);
        child.wait().unwrap();
        if let Some(it) = it {
            assert!(it.is_gone(), "a reaped process is gone");
        }
        // The same PID at another start time is another process.
        let earlier = Owner {
            started: me.started.wrapping_sub(1),
            ..me
        };
        assert!(earlier.is_gone());
        // Another namespace's owner cannot be judged, so is left alone.
        let elsewhere = Owner {
            namespace: me.namespace.wrapping_add(1),
            ..earlier
        };
        assert!(!elsewhere.is_gone());
        assert_eq!(Owner::parse("1:2"), None);
        assert_eq!(Owner::parse("1:2:3:4"), None);
    }
}
