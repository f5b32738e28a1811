//! The HTTP server loop of the fault-injecting servers (the token server and the API proxy):
//! our own accept loop on hyper rather than `axum::serve`, because a handler must be able to
//! close its connection with an RST and no response, which axum cannot express. A handler
//! gets a [`ConnectionKiller`] as a request extension for that.
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Lets a handler close its own connection with an RST and no response
/// (`Extension<ConnectionKiller>`).
#[derive(Clone)]
pub(crate) struct ConnectionKiller(Arc<Notify>);

impl ConnectionKiller {
    pub(crate) async fn kill(&self) -> Response {
        self.0.notify_one();
        // The connection task drops this future together with the connection.
        std::future::pending::<Response>().await
    }
}

/// Serve `router` on every connection `listener` accepts, until this future is dropped
/// (dropping it aborts every connection task). `server` names the server in the debug log.
pub(crate) async fn accept_loop(listener: TcpListener, router: Router, server: &'static str) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, router.clone()));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "{server}: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, router: Router) {
    let _ = stream.set_nodelay(true);
    // A duplicate of the socket so that a reset can set SO_LINGER=0 after hyper owns the stream.
    #[cfg(unix)]
    let socket_dup = {
        use std::os::fd::AsFd as _;
        stream.as_fd().try_clone_to_owned().ok()
    };
    let notify = Arc::new(Notify::new());
    let killer = ConnectionKiller(Arc::clone(&notify));
    let tower = TowerToHyperService::new(router);
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(killer.clone());
        hyper::service::Service::call(&tower, req)
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut connection = Box::pin(builder.serve_connection(TokioIo::new(stream), service));
    let killed = tokio::select! {
        _ = &mut connection => false,
        () = notify.notified() => true,
    };
    if killed {
        #[cfg(unix)]
        if let Some(fd) = &socket_dup {
            // Closing with a zero linger sends RST instead of FIN.
            let _ = socket2::SockRef::from(fd).set_linger(Some(Duration::ZERO));
        }
    }
    // `connection` drops first (closing hyper's descriptor), then `socket_dup` (the last one).
}
