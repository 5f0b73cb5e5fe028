//! `netlink`: the nbd driver's generic-netlink interface (kernel 4.12+).
//!
//! - [`codec`]: netlink/generic-netlink framing and attributes, pure.
//! - [`nbd_family`]: the "nbd" family's requests and replies, pure.
//! - [`socket`]: the NETLINK_GENERIC socket (send one request, collect replies up to the ack).
//! - [`NbdNetlink`]: the family resolved to its id, with one method per command.

pub mod codec;
pub mod nbd_family;
pub mod socket;

use self::codec::{
    encode_get_family, parse_family_id, GenlMessage, CTRL_CMD_NEWFAMILY, GENL_ID_CTRL,
};
use self::nbd_family::{
    encode_connect, encode_disconnect, encode_reconfigure, encode_status, parse_connect_reply,
    parse_status, ConnectRequest, DeviceStatus, ReconfigureRequest, NBD_CMD_CONNECT,
    NBD_CMD_STATUS, NBD_GENL_FAMILY_NAME,
};
use self::socket::{GenlSocket, OwnedGenlReply};
use super::error::KernelError;

/// A generic-netlink socket with the "nbd" family id resolved. Invariant: `family` is the id
/// the kernel's controller returned for "nbd" on this boot.
#[derive(Debug)]
pub struct NbdNetlink {
    socket: GenlSocket,
    family: u16,
}

fn genl<'a>(reply: &'a OwnedGenlReply, family: u16) -> GenlMessage<'a> {
    GenlMessage {
        family,
        cmd: reply.cmd,
        version: 0,
        attrs: &reply.attrs,
    }
}

/// Asks the generic-netlink controller for the id of family `name`. An unknown family is
/// [`KernelError::NetlinkRefused`] with errno ENOENT.
pub fn resolve_family(socket: &mut GenlSocket, name: &str) -> Result<u16, KernelError> {
    let msg = encode_get_family(socket.next_seq(), name);
    let replies = socket.request("CTRL_CMD_GETFAMILY", &msg)?;
    let reply =
        replies
            .iter()
            .find(|r| r.cmd == CTRL_CMD_NEWFAMILY)
            .ok_or(KernelError::NetlinkReply {
                request: "CTRL_CMD_GETFAMILY",
                source: codec::ParseError::MissingAttribute {
                    request: "CTRL_CMD_GETFAMILY",
                    attribute: "CTRL_CMD_NEWFAMILY reply",
                },
            })?;
    parse_family_id(&genl(reply, GENL_ID_CTRL)).map_err(|source| KernelError::NetlinkReply {
        request: "CTRL_CMD_GETFAMILY",
        source,
    })
}

impl NbdNetlink {
    /// Opens a socket and resolves the "nbd" family. When the family does not exist (the
    /// module is not loaded, or predates netlink support) this is [`KernelError::ModuleNotLoaded`]
    /// and the caller may fall back to ioctls.
    pub fn open() -> Result<Self, KernelError> {
        let mut socket = GenlSocket::open()?;
        let family = match resolve_family(&mut socket, NBD_GENL_FAMILY_NAME) {
            Ok(id) => id,
            Err(KernelError::NetlinkRefused {
                errno: libc::ENOENT,
                ..
            }) => return Err(KernelError::ModuleNotLoaded),
            Err(e) => return Err(e),
        };
        Ok(Self { socket, family })
    }

    /// The resolved family id.
    pub fn family(&self) -> u16 {
        self.family
    }

    /// Sends `NBD_CMD_CONNECT`; returns the index of the device the kernel configured. The
    /// socket descriptors in `req` must stay open until this returns (the kernel takes its own
    /// references while handling the request).
    pub fn connect(&mut self, req: &ConnectRequest) -> Result<u32, KernelError> {
        let msg = encode_connect(self.family, self.socket.next_seq(), req);
        let replies = self
            .socket
            .request("NBD_CMD_CONNECT", &msg)
            .map_err(|e| name_device(e, req.index))?;
        match replies.iter().find(|r| r.cmd == NBD_CMD_CONNECT) {
            Some(r) => parse_connect_reply(&genl(r, self.family)).map_err(|source| {
                KernelError::NetlinkReply {
                    request: "NBD_CMD_CONNECT",
                    source,
                }
            }),
            // Acknowledged without the index reply: the device we asked for is the one.
            None => req.index.ok_or(KernelError::NetlinkReply {
                request: "NBD_CMD_CONNECT",
                source: codec::ParseError::MissingAttribute {
                    request: "NBD_CMD_CONNECT",
                    attribute: "NBD_ATTR_INDEX",
                },
            }),
        }
    }

    /// Sends `NBD_CMD_DISCONNECT` for device `index`.
    pub fn disconnect(&mut self, index: u32) -> Result<(), KernelError> {
        let msg = encode_disconnect(self.family, self.socket.next_seq(), index);
        self.socket
            .request("NBD_CMD_DISCONNECT", &msg)
            .map_err(|e| name_device(e, Some(index)))?;
        Ok(())
    }

    /// Sends `NBD_CMD_RECONFIGURE` (new sockets and/or timeouts for a running device).
    pub fn reconfigure(&mut self, req: &ReconfigureRequest) -> Result<(), KernelError> {
        let msg = encode_reconfigure(self.family, self.socket.next_seq(), req);
        self.socket
            .request("NBD_CMD_RECONFIGURE", &msg)
            .map_err(|e| name_device(e, Some(req.index)))?;
        Ok(())
    }

    /// Sends `NBD_CMD_STATUS`; returns the devices the kernel knows (one, or none if `index`
    /// does not exist; all devices when `index` is `None`).
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>, KernelError> {
        let msg = encode_status(self.family, self.socket.next_seq(), index);
        let replies = self.socket.request("NBD_CMD_STATUS", &msg)?;
        let mut out = Vec::new();
        for r in replies.iter().filter(|r| r.cmd == NBD_CMD_STATUS) {
            out.extend(parse_status(&genl(r, self.family)).map_err(|source| {
                KernelError::NetlinkReply {
                    request: "NBD_CMD_STATUS",
                    source,
                }
            })?);
        }
        Ok(out)
    }
}

/// Adds the device to a refusal's request name ("NBD_CMD_CONNECT for /dev/nbd3").
fn name_device(e: KernelError, index: Option<u32>) -> KernelError {
    match (e, index) {
        (
            KernelError::NetlinkRefused {
                request,
                errno,
                hint,
            },
            Some(i),
        ) => KernelError::NetlinkRefused {
            request: format!("{request} for /dev/nbd{i}"),
            errno,
            hint,
        },
        (e, _) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::kernel::error::MODULE_NOT_LOADED;

    /// On this machine the kernel has no nbd driver, so the real family lookup must report
    /// the module error with its exact text. Where the module is loaded, the lookup succeeds
    /// and STATUS answers for device 0.
    #[test]
    fn family_lookup_without_nbd_module_reports_modprobe_hint() {
        let module_loaded = std::path::Path::new("/sys/module/nbd").exists();
        match NbdNetlink::open() {
            Err(e) => {
                assert!(!module_loaded, "nbd is loaded but the lookup failed: {e}");
                assert!(matches!(e, KernelError::ModuleNotLoaded), "{e:?}");
                assert_eq!(e.to_string(), MODULE_NOT_LOADED);
                assert_eq!(
                    e.to_string(),
                    "the nbd kernel module is not loaded: run `modprobe nbd` (package linux-modules-extra \
                     on some distributions); check that /dev/nbd0 exists"
                );
            }
            Ok(mut nl) => {
                assert!(
                    module_loaded,
                    "family resolved but /sys/module/nbd is absent"
                );
                assert_ne!(nl.family(), 0);
                let devices = nl.status(Some(0)).unwrap();
                assert!(devices.iter().all(|d| d.index == 0));
            }
        }
    }

    /// The socket layer against the real kernel, no nbd needed: the controller knows itself.
    #[test]
    fn controller_resolves_its_own_family_id_over_a_real_socket() {
        let mut socket = GenlSocket::open().unwrap();
        assert_eq!(resolve_family(&mut socket, "nlctrl").unwrap(), GENL_ID_CTRL);
        // A second request on the same socket uses the next sequence number and still works.
        assert_eq!(resolve_family(&mut socket, "nlctrl").unwrap(), GENL_ID_CTRL);
    }

    #[test]
    fn unknown_family_is_refused_with_enoent_over_a_real_socket() {
        let mut socket = GenlSocket::open().unwrap();
        let e = resolve_family(&mut socket, "twinvol-nofam").unwrap_err();
        assert!(
            matches!(
                e,
                KernelError::NetlinkRefused {
                    errno: libc::ENOENT,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("CTRL_CMD_GETFAMILY"), "{e}");
    }

    #[test]
    fn refusal_names_the_device() {
        let e = KernelError::NetlinkRefused {
            request: "NBD_CMD_CONNECT".into(),
            errno: libc::EBUSY,
            hint: "h",
        };
        let e = name_device(e, Some(3));
        assert!(
            e.to_string().contains("NBD_CMD_CONNECT for /dev/nbd3"),
            "{e}"
        );
    }
}
