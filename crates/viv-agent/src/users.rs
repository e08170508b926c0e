//! Guest users and groups, read from the root file system's `/etc/passwd` and `/etc/group`.
//!
//! The agent is statically linked, so it parses these files itself instead of going through NSS.

use crate::sys::FsIdentity;

/// One account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
    /// Supplementary groups, primary group included.
    pub groups: Vec<u32>,
}

impl User {
    /// The identity file operations on this user's behalf run with.
    pub fn fs_identity(&self) -> FsIdentity {
        FsIdentity {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// Looks up a user by name in `/etc/passwd`.
pub fn lookup(name: &str) -> Option<User> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    parse_user(&passwd, &group, name)
}

fn parse_user(passwd: &str, group: &str, name: &str) -> Option<User> {
    let line = passwd.lines().find(|l| l.split(':').next() == Some(name))?;
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() < 7 {
        return None;
    }
    let uid = fields[2].parse().ok()?;
    let gid = fields[3].parse().ok()?;
    let mut groups = vec![gid];
    for g in group.lines() {
        let gf: Vec<&str> = g.split(':').collect();
        if gf.len() >= 4 && gf[3].split(',').any(|m| m == name) {
            if let Ok(id) = gf[2].parse() {
                if !groups.contains(&id) {
                    groups.push(id);
                }
            }
        }
    }
    Some(User {
        name: name.to_owned(),
        uid,
        gid,
        home: fields[5].to_owned(),
        shell: fields[6].to_owned(),
        groups,
    })
}

/// The name for a uid, or the number itself.
pub fn user_name(uid: u32) -> String {
    name_by_id("/etc/passwd", uid)
}

/// The name for a gid, or the number itself.
pub fn group_name(gid: u32) -> String {
    name_by_id("/etc/group", gid)
}

/// The gid of a group name (or a number given as text).
pub fn group_id(name: &str) -> Option<u32> {
    if let Ok(id) = name.parse() {
        return Some(id);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok()).flatten()
    })
}

fn name_by_id(file: &str, id: u32) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let _ = f.next();
            (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_owned())
        })
        .unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_user;

    #[test]
    fn parses_user_and_groups() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n";
        let group = "root:x:0:\nsudo:x:27:user,other\nuser:x:1000:\n";
        let user = parse_user(passwd, group, "user").unwrap();
        assert_eq!((user.uid, user.gid, user.home.as_str()), (1000, 1000, "/home/user"));
        assert_eq!(user.groups, vec![1000, 27]);
        assert!(parse_user(passwd, group, "nobody").is_none());
    }
}
