//! Pure decisions: ceilings, what needs approval, the grant state machine, the objects agentid
//! wants, and status conditions. Nothing here talks to the apiserver; everything here is unit
//! tested.

pub mod approval;
pub mod capacity;
pub mod ceiling;
pub mod classify;
pub mod conditions;
pub mod decide;
pub mod desired;
pub mod drift;
pub mod exposure;
#[doc(hidden)]
pub mod fuzz;
pub mod install;
pub mod lease;
pub mod names;

#[cfg(test)]
pub(crate) mod testing;
