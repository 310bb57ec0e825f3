//! Who gets one of the control socket's connection slots: a pure table, no IO.
//!
//! Identity is known at accept time (`SO_PEERCRED`), so slots go only to authorized
//! peers: a peer with no role never holds one. Admins (root, the daemon user, the
//! admin group) may use every slot; technicians share all but the admins' reserve,
//! and each technician uid holds at most `per_uid` at once. So neither strangers nor a
//! busy technician script can lock root out of its own daemon.

use std::collections::HashMap;

use super::protocol::Role;

/// Why a connection got no slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoSlot {
    /// Every slot open to this role is taken.
    Full { limit: usize },
    /// This uid already holds its share.
    PerUid { uid: u32, limit: usize },
}

impl std::fmt::Display for NoSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full { limit } => write!(f, "the daemon is busy: all {limit} connections open to you are in use"),
            Self::PerUid { uid, limit } => {
                write!(f, "the daemon is busy: uid {uid} already has {limit} connections open (the most one user may)")
            }
        }
    }
}

#[derive(Debug)]
pub struct Slots {
    total: usize,
    /// Slots only admins may take.
    admin_reserve: usize,
    per_uid: usize,
    in_use: usize,
    technicians: usize,
    by_uid: HashMap<u32, usize>,
}

impl Slots {
    /// `total` slots; a reserve of one in eight (at least one, when there are two or
    /// more) is kept for admins.
    pub fn new(total: usize, per_uid: usize) -> Self {
        let admin_reserve = if total >= 2 { (total / 8).max(1) } else { 0 };
        Self { total, admin_reserve, per_uid, in_use: 0, technicians: 0, by_uid: HashMap::new() }
    }

    /// Takes a slot for an authorized peer, or says why not.
    pub fn admit(&mut self, uid: u32, role: Role) -> Result<(), NoSlot> {
        match role {
            Role::Admin => {
                if self.in_use >= self.total {
                    return Err(NoSlot::Full { limit: self.total });
                }
            }
            Role::Technician => {
                let limit = self.total - self.admin_reserve;
                if self.technicians >= limit || self.in_use >= self.total {
                    return Err(NoSlot::Full { limit });
                }
                if self.by_uid.get(&uid).copied().unwrap_or(0) >= self.per_uid {
                    return Err(NoSlot::PerUid { uid, limit: self.per_uid });
                }
                self.technicians += 1;
            }
        }
        self.in_use += 1;
        *self.by_uid.entry(uid).or_default() += 1;
        Ok(())
    }

    /// Gives back a slot `admit` granted.
    pub fn release(&mut self, uid: u32, role: Role) {
        self.in_use = self.in_use.saturating_sub(1);
        if role == Role::Technician {
            self.technicians = self.technicians.saturating_sub(1);
        }
        if let Some(n) = self.by_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn technicians_cannot_take_the_admins_reserve() {
        let mut slots = Slots::new(16, 16);
        for uid in 1000..1014 {
            slots.admit(uid, Role::Technician).unwrap();
        }
        assert_eq!(slots.admit(2000, Role::Technician), Err(NoSlot::Full { limit: 14 }));
        slots.admit(0, Role::Admin).unwrap();
        slots.admit(0, Role::Admin).unwrap();
        assert_eq!(slots.admit(0, Role::Admin), Err(NoSlot::Full { limit: 16 }));
        slots.release(1000, Role::Technician);
        slots.admit(2000, Role::Technician).unwrap();
    }

    #[test]
    fn one_technician_cannot_take_every_slot() {
        let mut slots = Slots::new(16, 4);
        for _ in 0..4 {
            slots.admit(1000, Role::Technician).unwrap();
        }
        assert_eq!(slots.admit(1000, Role::Technician), Err(NoSlot::PerUid { uid: 1000, limit: 4 }));
        slots.admit(1001, Role::Technician).unwrap();
        slots.release(1000, Role::Technician);
        slots.admit(1000, Role::Technician).unwrap();
        assert_eq!(slots.in_use(), 5);
    }

    #[test]
    fn a_single_slot_has_no_reserve() {
        let mut slots = Slots::new(1, 1);
        slots.admit(1000, Role::Technician).unwrap();
        assert!(slots.admit(0, Role::Admin).is_err());
    }
}
