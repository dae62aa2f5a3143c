//! Black-box tests of the simulator over real HTTP on loopback.

mod alipay;
mod binary;
mod faults;
mod helpers;
mod persist;
mod supplier;
mod wechatpay;
