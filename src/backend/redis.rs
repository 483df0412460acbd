//! One multiplexed connection to Redis, standalone or cluster, that reconnects by itself.
//!
//! Every instance keeps one such connection (cheap to clone: clones share the socket). Concurrent
//! commands from many requests are written to the socket back to back without waiting for each
//! other's replies, so requests are pipelined without a connection per request. A standalone
//! server is reached through redis-rs's `ConnectionManager` (reconnects with backoff after an
//! outage); a cluster through its `ClusterConnection` (follows slot moves, reconnects to nodes).
//! Every call has a response timeout, so an outage turns into errors (503 upstream), never into
//! requests that hang.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::time::Duration;

/// How long one command may wait for its reply before it fails.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where Redis is: one server, or the seed nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// `redis://host:port[/db]` URLs; a cluster takes every seed node, a standalone server one.
    pub urls: Vec<String>,
    pub cluster: bool,
}

impl RedisTarget {
    /// A target from a comma-separated URL list (the `--redis-url` flag).
    pub fn parse(urls: &str, cluster: bool) -> RedisTarget {
        RedisTarget {
            urls: urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect(),
            cluster,
        }
    }

    /// The first URL: where a standalone connection or a Pub/Sub connection goes. (In a cluster,
    /// classic Pub/Sub messages reach every node, so any node will do.)
    pub fn first_url(&self) -> &str {
        self.urls.first().map(String::as_str).unwrap_or("")
    }
}

/// A shared multiplexed connection; clone it freely.
#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects (the server must be reachable now; afterwards outages are survived).
    pub async fn connect(target: &RedisTarget) -> RedisResult<RedisConn> {
        if target.cluster {
            let client = ClusterClient::builder(target.urls.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .build()?;
            Ok(RedisConn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(target.first_url())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Ok(RedisConn::Standalone(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// True when Redis answers a PING now (readiness).
    pub async fn ping(&mut self) -> bool {
        let reply: RedisResult<String> = redis::cmd("PING").query_async(self).await;
        reply.is_ok()
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleettracker_testkit::{RedisCluster, RedisServer};

    #[test]
    fn parses_url_lists() {
        let t = RedisTarget::parse("redis://a:1, redis://b:2,", true);
        assert_eq!(t.urls, ["redis://a:1", "redis://b:2"]);
        assert_eq!(t.first_url(), "redis://a:1");
    }

    #[tokio::test]
    async fn standalone_survives_an_outage() {
        let mut server = RedisServer::start();
        let target = RedisTarget::parse(&server.url(), false);
        let mut conn = RedisConn::connect(&target).await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        server.stop();
        assert!(!conn.ping().await);
        server.resume();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !conn.ping().await {
            assert!(std::time::Instant::now() < deadline, "no reconnect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn cluster_routes_keys_to_their_nodes() {
        let cluster = RedisCluster::start(3);
        let target = RedisTarget {
            urls: cluster.urls(),
            cluster: true,
        };
        let mut conn = RedisConn::connect(&target).await.unwrap();
        for i in 0..50 {
            let _: () = redis::cmd("SET")
                .arg(format!("k{i}"))
                .arg(i)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let n: i64 = redis::cmd("GET")
            .arg("k42")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 42);
        assert!(conn.ping().await);
    }
}
