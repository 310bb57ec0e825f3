//! Who is on the other end of the control socket, and what they may do.
//!
//! Identity comes from the kernel (`SO_PEERCRED`), never from the request.
//! Group membership is the user database's (`getgrouplist`) plus the peer's
//! primary gid, so removing a technician from the group takes effect at once.

use std::ffi::CString;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{getgrouplist, Gid, Group, Uid, User};

use super::protocol::Role;
use crate::config::ControlConfig;

/// The kernel-reported identity of a connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

/// The rules in force: resolved from the config's group names at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// The daemon's own uid: whoever runs as it already controls the daemon.
    pub daemon_uid: u32,
    pub admin_gid: Option<u32>,
    pub technician_gid: Option<u32>,
}

impl AccessPolicy {
    pub fn from_config(control: &ControlConfig) -> Self {
        let gid_of = |name: &str| Group::from_name(name).ok().flatten().map(|g| g.gid.as_raw());
        Self {
            daemon_uid: Uid::effective().as_raw(),
            admin_gid: gid_of(&control.admin_group),
            technician_gid: gid_of(&control.technician_group),
        }
    }

    /// The role of a peer with this uid and these groups, or None if it may do nothing.
    pub fn role_of(&self, uid: u32, groups: &[u32]) -> Option<Role> {
        let member = |gid: Option<u32>| gid.is_some_and(|g| groups.contains(&g));
        if uid == 0 || uid == self.daemon_uid || member(self.admin_gid) {
            Some(Role::Admin)
        } else if member(self.technician_gid) {
            Some(Role::Technician)
        } else {
            None
        }
    }
}

pub fn peer_of(stream: &impl AsFd) -> nix::Result<Peer> {
    let cred = getsockopt(stream, PeerCredentials)?;
    Ok(Peer { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() })
}

/// The peer's groups: its primary gid plus the user database's supplementary groups.
/// Blocking (NSS); call from a blocking context.
pub fn groups_of(peer: &Peer) -> Vec<u32> {
    let mut groups = vec![peer.gid];
    if let Ok(Some(user)) = User::from_uid(Uid::from_raw(peer.uid)) {
        if let Ok(name) = CString::new(user.name) {
            if let Ok(list) = getgrouplist(&name, Gid::from_raw(peer.gid)) {
                groups.extend(list.into_iter().map(Gid::as_raw));
            }
        }
    }
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// A user name for messages ("uid 65534 (nobody)").
pub fn describe_uid(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: AccessPolicy = AccessPolicy { daemon_uid: 990, admin_gid: Some(991), technician_gid: Some(992) };

    #[test]
    fn root_and_daemon_user_are_admins() {
        assert_eq!(POLICY.role_of(0, &[]), Some(Role::Admin));
        assert_eq!(POLICY.role_of(990, &[990]), Some(Role::Admin));
    }

    #[test]
    fn group_membership_decides_for_everyone_else() {
        assert_eq!(POLICY.role_of(1000, &[1000, 991]), Some(Role::Admin));
        assert_eq!(POLICY.role_of(1000, &[1000, 992]), Some(Role::Technician));
        assert_eq!(POLICY.role_of(1000, &[1000, 991, 992]), Some(Role::Admin));
        assert_eq!(POLICY.role_of(1000, &[1000]), None);
    }

    #[test]
    fn missing_groups_grant_nothing() {
        let policy = AccessPolicy { daemon_uid: 990, admin_gid: None, technician_gid: None };
        assert_eq!(policy.role_of(1000, &[1000, 991, 992]), None);
        assert_eq!(policy.role_of(0, &[]), Some(Role::Admin));
    }

    #[test]
    fn peer_credentials_come_from_the_kernel() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = peer_of(&a).unwrap();
        assert_eq!(peer.uid, Uid::effective().as_raw());
        assert_eq!(peer.pid as u32, std::process::id());
        assert!(groups_of(&peer).contains(&peer.gid));
    }
}
