//! libvirt domain XML (the common devices), read from a hostile document for an import: name,
//! vCPUs, memory, firmware, disks and CD-ROMs by source path, network cards.
//!
//! Invariants: as for OVF descriptors ([`crate::ovf`]), a document larger than
//! [`MAX_DOMAIN_SIZE`] or with a document type declaration is refused before parsing, so no
//! entity is expanded; numbers are bounded; source paths are returned as written, for the caller
//! to accept only inside its pool (this module never touches a file).

/// The largest domain document read, bytes.
pub const MAX_DOMAIN_SIZE: usize = 1 << 20;
/// The most disks and CD-ROMs read.
pub const MAX_DOMAIN_DISKS: usize = 16;
/// The most network cards read.
pub const MAX_DOMAIN_NICS: usize = 8;

/// A disk or CD-ROM of the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// `disk` or `cdrom`.
    pub cdrom: bool,
    /// The source file as written (absent for an empty CD-ROM drive).
    pub source: Option<String>,
    /// The target bus (`virtio`, `sata`, `scsi`, `ide`...).
    pub bus: Option<String>,
    /// `<readonly/>`.
    pub read_only: bool,
    /// `<shareable/>`.
    pub shareable: bool,
}

/// A network card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainNic {
    /// `<model type=…>`.
    pub model: Option<String>,
    /// `<mac address=…>`.
    pub mac: Option<String>,
}

/// What an import takes from a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`.
    pub name: String,
    /// `<vcpu>` (1 when absent).
    pub vcpus: u32,
    /// `<memory>` in MiB (0 when absent).
    pub memory_mib: u64,
    /// `<os firmware='efi'>` or an OVMF/pflash `<loader>`.
    pub uefi: bool,
    /// Disks and CD-ROMs in document order.
    pub disks: Vec<DomainDisk>,
    /// Network cards.
    pub nics: Vec<DomainNic>,
}

/// Why a domain document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Too large.
    #[error("the domain XML is larger than {MAX_DOMAIN_SIZE} bytes")]
    TooLarge,
    /// Has a DTD.
    #[error("the domain XML has a document type declaration, which libvirt never writes")]
    Doctype,
    /// Not well-formed.
    #[error("the domain XML is not well-formed: {0}")]
    Xml(String),
    /// Not a domain or out of bounds.
    #[error("the domain XML {0}")]
    Invalid(String),
}

/// The first child element of `node` named `name`.
fn element<'a, 'input>(node: roxmltree::Node<'a, 'input>, name: &str) -> Option<roxmltree::Node<'a, 'input>> {
    node.children().find(|c| c.is_element() && c.tag_name().name() == name)
}

/// Reads a domain document.
pub fn parse(bytes: &[u8]) -> Result<Domain, DomainError> {
    if bytes.len() > MAX_DOMAIN_SIZE {
        return Err(DomainError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| DomainError::Xml("not UTF-8".into()))?;
    if text.contains("<!DOCTYPE") || text.contains("<!ENTITY") {
        return Err(DomainError::Doctype);
    }
    let doc = roxmltree::Document::parse(text).map_err(|e| DomainError::Xml(e.to_string()))?;
    let root = doc.root_element();
    let invalid = |m: String| DomainError::Invalid(m);
    if root.tag_name().name() != "domain" {
        return Err(invalid("is not a <domain>".into()));
    }
    let text_of = |node: Option<roxmltree::Node<'_, '_>>| node.and_then(|n| n.text()).map(|t| t.trim().to_owned());
    let name = text_of(element(root, "name")).ok_or_else(|| invalid("has no <name>".into()))?;
    let vcpus = match text_of(element(root, "vcpu")) {
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| invalid(format!("asks for {v:?} vCPUs")))?,
        None => 1,
    };
    let memory_mib = match element(root, "memory") {
        Some(memory) => {
            let value = memory.text().unwrap_or_default().trim().to_owned();
            let n: u64 = value
                .parse()
                .map_err(|_| invalid(format!("has the memory {value:?}")))?;
            let shift = match memory.attribute("unit").unwrap_or("KiB") {
                "b" | "bytes" => 0,
                "KiB" | "k" | "K" | "KB" => 10,
                "MiB" | "M" | "MB" => 20,
                "GiB" | "G" | "GB" => 30,
                "TiB" | "T" | "TB" => 40,
                other => return Err(invalid(format!("has the memory unit {other:?}"))),
            };
            let mib = n.checked_mul(1u64 << shift).map(|b| b >> 20).unwrap_or(u64::MAX);
            if mib == 0 || mib > 16 << 20 {
                return Err(invalid(format!(
                    "asks for {value} {} of memory",
                    memory.attribute("unit").unwrap_or("KiB")
                )));
            }
            mib
        }
        None => 0,
    };
    let os = element(root, "os");
    let uefi = os.is_some_and(|os| {
        os.attribute("firmware") == Some("efi")
            || element(os, "loader")
                .is_some_and(|l| l.attribute("type") == Some("pflash") || l.text().is_some_and(|t| t.contains("OVMF")))
    });
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    if let Some(devices) = element(root, "devices") {
        for device in devices.children().filter(|c| c.is_element()) {
            match device.tag_name().name() {
                "disk" => {
                    let cdrom = match device.attribute("device").unwrap_or("disk") {
                        "disk" => false,
                        "cdrom" => true,
                        _ => continue,
                    };
                    if device.attribute("type").unwrap_or("file") != "file" {
                        return Err(invalid(format!(
                            "has a {} disk: only file disks (type='file') are imported",
                            device.attribute("type").unwrap_or_default()
                        )));
                    }
                    if disks.len() == MAX_DOMAIN_DISKS {
                        return Err(invalid(format!("has more than {MAX_DOMAIN_DISKS} disks")));
                    }
                    disks.push(DomainDisk {
                        cdrom,
                        source: element(device, "source")
                            .and_then(|s| s.attribute("file"))
                            .map(str::to_owned),
                        bus: element(device, "target")
                            .and_then(|t| t.attribute("bus"))
                            .map(str::to_owned),
                        read_only: element(device, "readonly").is_some(),
                        shareable: element(device, "shareable").is_some(),
                    });
                }
                "interface" if nics.len() < MAX_DOMAIN_NICS => nics.push(DomainNic {
                    model: element(device, "model")
                        .and_then(|m| m.attribute("type"))
                        .map(str::to_owned),
                    mac: element(device, "mac")
                        .and_then(|m| m.attribute("address"))
                        .map(str::to_owned),
                }),
                _ => {}
            }
        }
    }
    Ok(Domain {
        name,
        vcpus,
        memory_mib,
        uefi,
        disks,
        nics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='kvm'>
  <name>web</name>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static'>2</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/pool/disks/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/pool/isos/inst.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='e1000'/></interface>
  </devices>
</domain>"#;

    #[test]
    fn reads_the_common_devices() {
        let d = parse(DOMAIN.as_bytes()).unwrap();
        assert_eq!((d.name.as_str(), d.vcpus, d.memory_mib, d.uefi), ("web", 2, 256, true));
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].source.as_deref(), Some("/pool/disks/web.qcow2"));
        assert!(d.disks[1].cdrom && d.disks[1].read_only);
        assert_eq!(d.nics[0].model.as_deref(), Some("e1000"));
        assert_eq!(d.nics[0].mac.as_deref(), Some("52:54:00:12:34:56"));
    }

    #[test]
    fn refuses_hostile_documents() {
        let lol = r#"<!DOCTYPE d [<!ENTITY a "a">]><domain><name>&a;</name></domain>"#;
        assert_eq!(parse(lol.as_bytes()), Err(DomainError::Doctype));
        let huge = DOMAIN.replace("262144", "99999999999999999");
        assert!(matches!(parse(huge.as_bytes()), Err(DomainError::Invalid(_))));
        let block = DOMAIN.replace("<disk type='file' device='disk'>", "<disk type='block' device='disk'>");
        assert!(matches!(parse(block.as_bytes()), Err(DomainError::Invalid(_))));
        assert!(matches!(parse(b"<domain>"), Err(DomainError::Xml(_))));
        assert!(matches!(parse(b"<domain/>"), Err(DomainError::Invalid(_))));
    }
}
