//! The capwatch wire protocol. Generated from `capwatch/v1/*.proto`; the
//! agent and collector convert to their own domain types at the edge.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("capwatch.v1");
}
