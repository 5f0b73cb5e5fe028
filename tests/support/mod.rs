//! Shared test support: moto, the fault proxy, a fake IMDSv2, and the VPC world.
#![allow(dead_code)]

pub mod fake_dns;
pub mod fake_imds;
pub mod fault_proxy;
pub mod moto;
pub mod world;
