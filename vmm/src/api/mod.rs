//! Control API: HTTP/1.1 + JSON on a Unix socket ([`server`]), the control
//! plane behind it ([`control`]), and the `vmm ctl` client ([`client`]).

pub mod client;
pub mod control;
pub mod server;

pub use control::{ActionError, ControlError, VmActions, VmControl};
pub use server::{ApiError, ApiServer};
