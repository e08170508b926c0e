//! OVF descriptors (DMTF DSP0243) of OVA packages: reading the parts a VM definition needs from a
//! hostile descriptor, and writing one for an exported VM.
//!
//! Invariants: a descriptor larger than [`MAX_OVF_SIZE`] or carrying a document type declaration
//! (where entities would be declared) is refused before any XML is parsed, so no entity is ever
//! expanded; every number is checked against its bounds (vCPUs, memory, disk capacity, counts);
//! a disk's file reference must be a bare file name (no separator, no leading dot), so it can
//! only name an entry of the package itself; elements are matched by local name (namespace
//! prefixes differ between producers) and unknown ones are ignored.

use crate::size::MAX_DISK_SIZE;

/// The largest descriptor read, in bytes.
pub const MAX_OVF_SIZE: usize = 1 << 20;
/// The most disks a package may carry.
pub const MAX_OVF_DISKS: usize = 16;
/// The most network cards read.
pub const MAX_OVF_NICS: usize = 8;
/// The most vCPUs accepted.
pub const MAX_OVF_CPUS: u32 = 1024;
/// The most memory accepted, MiB (16 TiB).
pub const MAX_OVF_MEMORY_MIB: u64 = 16 << 20;

/// One disk of the package, in the order the virtual hardware attaches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// The package entry holding its image (a bare file name).
    pub file: String,
    /// The capacity the descriptor states, bytes (0 when not stated).
    pub capacity: u64,
}

/// A network card: its model as the descriptor names it (`E1000`, `VmxNet3`, `virtio`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfNic {
    /// `ResourceSubType`, if any.
    pub model: Option<String>,
}

/// What a VM definition takes from a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovf {
    /// The virtual system's name (its `Name`, else its id).
    pub name: String,
    /// vCPUs (1 when not stated).
    pub cpus: u32,
    /// Memory in MiB (0 when not stated).
    pub memory_mib: u64,
    /// Disks in attachment order.
    pub disks: Vec<OvfDisk>,
    /// Network cards.
    pub nics: Vec<OvfNic>,
    /// Whether the descriptor asks for UEFI firmware (`vmw:Config firmware=efi`).
    pub uefi: bool,
}

/// Why a descriptor is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OvfError {
    /// Too large.
    #[error("the OVF descriptor is larger than {MAX_OVF_SIZE} bytes")]
    TooLarge,
    /// Has a DTD.
    #[error("the OVF descriptor has a document type declaration, which OVF never needs")]
    Doctype,
    /// Not well-formed XML.
    #[error("the OVF descriptor is not well-formed XML: {0}")]
    Xml(String),
    /// Not an OVF envelope, or a required part is missing.
    #[error("the OVF descriptor {0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> OvfError {
    OvfError::Invalid(message.into())
}

/// Reads a descriptor.
pub fn parse(bytes: &[u8]) -> Result<Ovf, OvfError> {
    if bytes.len() > MAX_OVF_SIZE {
        return Err(OvfError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| OvfError::Xml("not UTF-8".into()))?;
    if text.contains("<!DOCTYPE") || text.contains("<!ENTITY") {
        return Err(OvfError::Doctype);
    }
    let doc = roxmltree::Document::parse(text).map_err(|e| OvfError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err(invalid("is not an OVF Envelope"));
    }
    let attr = |node: roxmltree::Node, name: &str| -> Option<String> {
        node.attributes()
            .find(|a| a.name() == name)
            .map(|a| a.value().to_owned())
    };
    let child = |node: roxmltree::Node<'_, '_>, name: &str| -> Option<String> {
        node.children()
            .find(|c| c.is_element() && c.tag_name().name() == name)
            .and_then(|c| c.text())
            .map(|t| t.trim().to_owned())
    };
    // References: file id → href.
    let mut files = Vec::new();
    for file in root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "File")
    {
        let (Some(id), Some(href)) = (attr(file, "id"), attr(file, "href")) else {
            return Err(invalid("has a File without id or href"));
        };
        check_href(&href)?;
        files.push((id, href));
    }
    // DiskSection: disk id → (file, capacity).
    let mut disks = Vec::new();
    for disk in root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "Disk")
    {
        let id = attr(disk, "diskId").ok_or_else(|| invalid("has a Disk without diskId"))?;
        let file_ref = attr(disk, "fileRef").ok_or_else(|| invalid(format!("disk '{id}' has no fileRef")))?;
        let file = files
            .iter()
            .find(|(f, _)| *f == file_ref)
            .map(|(_, href)| href.clone())
            .ok_or_else(|| invalid(format!("disk '{id}' refers to the unknown file '{file_ref}'")))?;
        let capacity = match attr(disk, "capacity") {
            Some(c) => {
                let units = attr(disk, "capacityAllocationUnits").unwrap_or_else(|| "byte".into());
                let bytes = scaled(&c, &units).ok_or_else(|| invalid(format!("disk '{id}' has a bad capacity")))?;
                if bytes > MAX_DISK_SIZE {
                    return Err(invalid(format!("disk '{id}' is larger than {MAX_DISK_SIZE} bytes")));
                }
                bytes
            }
            None => 0,
        };
        disks.push((id, OvfDisk { file, capacity }));
    }
    let system = root
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "VirtualSystem")
        .ok_or_else(|| invalid("has no VirtualSystem"))?;
    let name = child(system, "Name")
        .filter(|n| !n.is_empty())
        .or_else(|| attr(system, "id"))
        .unwrap_or_else(|| "imported".into());
    let mut ovf = Ovf {
        name,
        cpus: 1,
        memory_mib: 0,
        disks: Vec::new(),
        nics: Vec::new(),
        uefi: false,
    };
    let items = system
        .descendants()
        .filter(|n| n.is_element() && matches!(n.tag_name().name(), "Item" | "StorageItem" | "EthernetPortItem"));
    for item in items {
        let Some(kind) = child(item, "ResourceType") else {
            continue;
        };
        match kind.as_str() {
            "3" => {
                let n: u32 = child(item, "VirtualQuantity")
                    .and_then(|q| q.parse().ok())
                    .ok_or_else(|| invalid("has a CPU item without a valid VirtualQuantity"))?;
                if n == 0 || n > MAX_OVF_CPUS {
                    return Err(invalid(format!("asks for {n} vCPUs")));
                }
                ovf.cpus = n;
            }
            "4" => {
                let quantity = child(item, "VirtualQuantity").unwrap_or_default();
                let units = child(item, "AllocationUnits").unwrap_or_else(|| "byte * 2^20".into());
                let bytes =
                    scaled(&quantity, &units).ok_or_else(|| invalid("has a memory item without a valid size"))?;
                let mib = bytes >> 20;
                if mib == 0 || mib > MAX_OVF_MEMORY_MIB {
                    return Err(invalid(format!("asks for {bytes} bytes of memory")));
                }
                ovf.memory_mib = mib;
            }
            "17" => {
                let Some(host) = child(item, "HostResource") else {
                    continue;
                };
                let id = host
                    .strip_prefix("ovf:/disk/")
                    .or_else(|| host.strip_prefix("/disk/"))
                    .ok_or_else(|| invalid(format!("has a disk item naming '{host}'")))?;
                let disk = disks
                    .iter()
                    .find(|(d, _)| d == id)
                    .map(|(_, d)| d.clone())
                    .ok_or_else(|| invalid(format!("attaches the unknown disk '{id}'")))?;
                if ovf.disks.len() == MAX_OVF_DISKS {
                    return Err(invalid(format!("has more than {MAX_OVF_DISKS} disks")));
                }
                ovf.disks.push(disk);
            }
            "10" if ovf.nics.len() < MAX_OVF_NICS => {
                ovf.nics.push(OvfNic {
                    model: child(item, "ResourceSubType"),
                });
            }
            _ => {}
        }
    }
    ovf.uefi = system.descendants().any(|n| {
        n.is_element()
            && n.tag_name().name() == "Config"
            && attr(n, "key").as_deref() == Some("firmware")
            && attr(n, "value").is_some_and(|v| v.eq_ignore_ascii_case("efi"))
    });
    Ok(ovf)
}

/// A file reference must be a bare, plain file name.
fn check_href(href: &str) -> Result<(), OvfError> {
    let ok = !href.is_empty()
        && href.len() <= 255
        && !href.starts_with('.')
        && href
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "refers to the file {href:?}: only plain names inside the package are accepted"
        )))
    }
}

/// `quantity` in `units` (`byte`, `byte * 2^N`, `KB`/`MB`/`GB`, `MegaBytes`...) as bytes.
fn scaled(quantity: &str, units: &str) -> Option<u64> {
    let n: u64 = quantity.trim().parse().ok()?;
    let units: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let shift = match units.as_str() {
        "byte" | "bytes" | "b" => 0,
        "kb" | "kilobytes" | "kib" => 10,
        "mb" | "megabytes" | "mib" => 20,
        "gb" | "gigabytes" | "gib" => 30,
        other => {
            let exponent: u32 = other.strip_prefix("byte*2^")?.parse().ok()?;
            if exponent > 50 {
                return None;
            }
            exponent
        }
    };
    n.checked_mul(1u64 << shift)
}

/// Writes a descriptor for `ovf`: each disk's file is its `file`, with its size on the host in
/// `file_sizes` (same order).
pub fn write(ovf: &Ovf, file_sizes: &[u64]) -> String {
    let mut references = String::new();
    let mut disk_section = String::new();
    let mut items = String::new();
    let mut instance = 1;
    let mut item = |items: &mut String, body: String| {
        items.push_str(&format!(
            "      <Item>\n        <rasd:InstanceID>{instance}</rasd:InstanceID>\n{body}      </Item>\n"
        ));
        instance += 1;
    };
    item(
        &mut items,
        format!(
            "        <rasd:ElementName>{} virtual CPU(s)</rasd:ElementName>\n        <rasd:ResourceType>3</rasd:ResourceType>\n        <rasd:VirtualQuantity>{}</rasd:VirtualQuantity>\n",
            ovf.cpus, ovf.cpus
        ),
    );
    item(
        &mut items,
        format!(
            "        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>\n        <rasd:ElementName>{} MB of memory</rasd:ElementName>\n        <rasd:ResourceType>4</rasd:ResourceType>\n        <rasd:VirtualQuantity>{}</rasd:VirtualQuantity>\n",
            ovf.memory_mib, ovf.memory_mib
        ),
    );
    for (i, disk) in ovf.disks.iter().enumerate() {
        let size = file_sizes.get(i).copied().unwrap_or(0);
        references.push_str(&format!(
            "    <File ovf:id=\"file{i}\" ovf:href=\"{}\" ovf:size=\"{size}\"/>\n",
            escape(&disk.file)
        ));
        disk_section.push_str(&format!(
            "    <Disk ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n",
            disk.capacity
        ));
        item(
            &mut items,
            format!(
                "        <rasd:ElementName>disk{i}</rasd:ElementName>\n        <rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>\n        <rasd:ResourceType>17</rasd:ResourceType>\n"
            ),
        );
    }
    for (i, nic) in ovf.nics.iter().enumerate() {
        let model = nic
            .model
            .as_deref()
            .map(|m| format!("        <rasd:ResourceSubType>{}</rasd:ResourceSubType>\n", escape(m)))
            .unwrap_or_default();
        item(
            &mut items,
            format!(
                "        <rasd:Connection>nat</rasd:Connection>\n        <rasd:ElementName>ethernet{i}</rasd:ElementName>\n{model}        <rasd:ResourceType>10</rasd:ResourceType>\n"
            ),
        );
    }
    let firmware = if ovf.uefi {
        "      <vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"efi\"/>\n"
    } else {
        ""
    };
    let name = escape(&ovf.name);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
{references}  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
{disk_section}  </DiskSection>
  <NetworkSection>
    <Info>Networks</Info>
    <Network ovf:name="nat"><Description>The VM's network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine exported by Vivarium</Info>
    <Name>{name}</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
{items}{firmware}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
        .replace('\r', "&#13;")
        .replace('\n', "&#10;")
        .replace('\t', "&#9;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ovf {
        Ovf {
            name: "web <1> & co".into(),
            cpus: 2,
            memory_mib: 256,
            disks: vec![
                OvfDisk {
                    file: "web-disk0.vmdk".into(),
                    capacity: 64 << 20,
                },
                OvfDisk {
                    file: "web-disk1.vmdk".into(),
                    capacity: 1 << 30,
                },
            ],
            nics: vec![OvfNic {
                model: Some("E1000".into()),
            }],
            uefi: true,
        }
    }

    #[test]
    fn a_written_descriptor_reads_back() {
        let ovf = sample();
        let text = write(&ovf, &[1000, 2000]);
        assert_eq!(parse(text.as_bytes()).unwrap(), ovf);
    }

    #[test]
    fn hostile_descriptors_are_refused() {
        let lol = r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>"#;
        assert_eq!(parse(lol.as_bytes()), Err(OvfError::Doctype));
        assert_eq!(parse(&vec![b' '; MAX_OVF_SIZE + 1]), Err(OvfError::TooLarge));
        let outside = write(&sample(), &[]).replace("web-disk0.vmdk", "../../etc/shadow");
        assert!(matches!(parse(outside.as_bytes()), Err(OvfError::Invalid(_))));
        let huge = write(&sample(), &[]).replace("<rasd:VirtualQuantity>2<", "<rasd:VirtualQuantity>99999999<");
        assert!(matches!(parse(huge.as_bytes()), Err(OvfError::Invalid(_))));
        let overflow = write(&sample(), &[]).replace(
            "ovf:capacity=\"1073741824\" ovf:capacityAllocationUnits=\"byte\"",
            "ovf:capacity=\"99999999999\" ovf:capacityAllocationUnits=\"byte * 2^40\"",
        );
        assert!(matches!(parse(overflow.as_bytes()), Err(OvfError::Invalid(_))));
        assert!(matches!(parse(b"<Nope/>"), Err(OvfError::Invalid(_))));
        assert!(matches!(parse(b"<Envelope"), Err(OvfError::Xml(_))));
    }

    #[test]
    fn units_scale() {
        assert_eq!(scaled("4", "byte * 2^30"), Some(4 << 30));
        assert_eq!(scaled("512", "MegaBytes"), Some(512 << 20));
        assert_eq!(scaled("1", "byte * 2^64"), None);
        assert_eq!(scaled("-1", "byte"), None);
    }
}
