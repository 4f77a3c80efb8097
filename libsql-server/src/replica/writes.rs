//! The client side of `proxy.Proxy`: what a replica sends its primary for the statements its
//! copy cannot run (writes, transactions). Each client stream of the replica is one
//! `client_id` on the primary, which keeps its transaction between calls.

use std::time::Duration;

use libsql_replication::rpc::proxy::proxy_client::ProxyClient;
use libsql_replication::rpc::proxy::{DisconnectMessage, ExecuteResults, Program, ProgramReq};
use libsql_replication::rpc::replication::NAMESPACE_METADATA_KEY;
use tonic::metadata::{AsciiMetadataValue, BinaryMetadataValue};
use tonic::transport::Channel;
use tonic::Status;

use crate::namespace::NamespaceName;

/// Where the libSQL server's proxy reads the grant a forwarded call runs under.
const PROXY_AUTHORIZATION: &str = "x-proxy-authorization";

/// The grant a forwarded call carries in [`PROXY_AUTHORIZATION`]: read and write (the
/// libSQL server's `Authenticated::FullAccess`, serialized).
const FORWARDED_GRANT: &str = "\"FullAccess\"";

/// The largest answer taken from the primary (its own answer bound comes first: 10 MB by
/// default on this server).
const MAX_ANSWER: usize = 64 << 20;

/// How long one forwarded program may take, the primary's write-lock wait included.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct PrimaryWrites {
    client: ProxyClient<Channel>,
    authorization: Option<AsciiMetadataValue>,
}

impl PrimaryWrites {
    /// Writes sent over `channel`, with `token` (if any) as the credential.
    pub fn new(channel: Channel, token: Option<&str>) -> Result<Self, Status> {
        let authorization = match token {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| Status::invalid_argument("the token is not ASCII"))?),
            None => None,
        };
        Ok(PrimaryWrites { client: ProxyClient::new(channel).max_decoding_message_size(MAX_ANSWER), authorization })
    }

    fn request<T>(&self, ns: &NamespaceName, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        let metadata = request.metadata_mut();
        metadata.insert_bin(NAMESPACE_METADATA_KEY, BinaryMetadataValue::from_bytes(ns.as_str().as_bytes()));
        if let Some(authorization) = &self.authorization {
            metadata.insert("authorization", authorization.clone());
        }
        // The libSQL server's proxy trusts the replica server that calls it to have
        // authenticated its client, and takes the grant it found from this header (JSON; it
        // refuses a call without it). Only grants that may write are ever forwarded here.
        metadata.insert(PROXY_AUTHORIZATION, AsciiMetadataValue::from_static(FORWARDED_GRANT));
        request
    }

    /// Runs `program` on the primary as client `client_id` of namespace `ns`.
    pub async fn execute(&self, ns: &NamespaceName, client_id: &str, program: Program) -> Result<ExecuteResults, Status> {
        let request = self.request(ns, ProgramReq { client_id: client_id.to_owned(), pgm: Some(program) });
        let mut client = self.client.clone();
        match tokio::time::timeout(CALL_TIMEOUT, client.execute(request)).await {
            Ok(answer) => Ok(answer?.into_inner()),
            Err(_) => Err(Status::deadline_exceeded("the primary did not answer in time")),
        }
    }

    /// Ends client `client_id`'s session on the primary (its transaction rolls back).
    pub async fn disconnect(&self, ns: &NamespaceName, client_id: &str) -> Result<(), Status> {
        let request = self.request(ns, DisconnectMessage { client_id: client_id.to_owned() });
        let mut client = self.client.clone();
        match tokio::time::timeout(CALL_TIMEOUT, client.disconnect(request)).await {
            Ok(answer) => answer.map(drop),
            Err(_) => Err(Status::deadline_exceeded("the primary did not answer in time")),
        }
    }
}
