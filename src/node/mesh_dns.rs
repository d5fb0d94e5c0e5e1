//! Names of Services, answered by the node for the DNS queries that agents relay:
//! `<service>.<namespace>.svc.<domain>` is the Service's ClusterIP, as the cluster's
//! DNS (CoreDNS' kubernetes plugin) answers it, with its 5 s TTL. Without a cluster the
//! node is the authority of the whole domain (any other name in it does not exist);
//! beside a cluster it answers the names of the Services it knows (standalone ones and
//! the cluster's ClusterIP Services it watches) and the cluster's DNS the rest. Names
//! outside the domain go to the upstream resolver. Pure: no I/O.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// The TTL of the cluster's DNS for Service records.
const TTL_SECS: u32 = 5;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// This answer, encoded.
    Local(Vec<u8>),
    /// Not a name of ours: ask the upstream resolver.
    Forward,
}

/// Answers `query` for the Services `lookup` (namespace, name) knows in `domain`.
pub fn answer(
    query: &[u8],
    domain: &str,
    authoritative: bool,
    lookup: impl Fn(&str, &str) -> Option<Ipv4Addr>,
) -> Answer {
    let Ok(message) = Message::from_vec(query) else {
        return Answer::Forward;
    };
    let [question] = message.queries.as_slice() else {
        return Answer::Forward;
    };
    if message.metadata.message_type != MessageType::Query
        || message.metadata.op_code != OpCode::Query
    {
        return Answer::Forward;
    }
    let name = question.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.');
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let in_domain = name == domain || name.ends_with(&format!(".{domain}"));
    if !in_domain {
        return Answer::Forward;
    }
    let service = name
        .strip_suffix(&format!(".svc.{domain}"))
        .and_then(|rest| rest.split_once('.'))
        .filter(|(_, namespace)| !namespace.contains('.'))
        .and_then(|(service, namespace)| lookup(namespace, service));
    let mut response = Message::response(message.metadata.id, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = message.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(question.clone());
    match service {
        Some(ip) => {
            if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
                response.add_answer(Record::from_rdata(
                    question.name().clone(),
                    TTL_SECS,
                    RData::A(A(ip)),
                ));
            }
        }
        None if authoritative => response.metadata.response_code = ResponseCode::NXDomain,
        None => return Answer::Forward,
    }
    match response.to_vec() {
        Ok(bytes) => Answer::Local(bytes),
        Err(_) => Answer::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 4242;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).expect("name"), kind));
        message.to_vec().expect("encode")
    }

    fn web(namespace: &str, name: &str) -> Option<Ipv4Addr> {
        (namespace == "default" && name == "web").then_some(Ipv4Addr::new(10, 80, 1, 2))
    }

    fn local(answer: Answer) -> Message {
        match answer {
            Answer::Local(bytes) => Message::from_vec(&bytes).expect("decode"),
            Answer::Forward => panic!("forwarded"),
        }
    }

    #[test]
    fn a_service_name_is_its_cluster_ip_and_other_names_of_the_domain_do_not_exist() {
        let found = local(answer(
            &query("Web.default.svc.cluster.local.", RecordType::A),
            "cluster.local",
            true,
            web,
        ));
        assert_eq!(found.metadata.id, 4242);
        assert_eq!(found.metadata.message_type, MessageType::Response);
        assert!(found.metadata.authoritative && found.metadata.recursion_desired);
        assert_eq!(found.metadata.response_code, ResponseCode::NoError);
        assert_eq!(found.queries.len(), 1);
        assert_eq!(found.answers.len(), 1);
        assert_eq!(found.answers[0].ttl, TTL_SECS);
        assert_eq!(found.answers[0].data, RData::A(A::new(10, 80, 1, 2)));

        // No IPv6 address: no data, but the name exists.
        let aaaa = local(answer(
            &query("web.default.svc.cluster.local.", RecordType::AAAA),
            "cluster.local",
            true,
            web,
        ));
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());

        for missing in [
            "db.default.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "a.web.default.svc.cluster.local.",
            "web.default.pod.cluster.local.",
        ] {
            let nx = local(answer(
                &query(missing, RecordType::A),
                "cluster.local",
                true,
                web,
            ));
            assert_eq!(
                nx.metadata.response_code,
                ResponseCode::NXDomain,
                "{missing}"
            );
        }
    }

    #[test]
    fn names_not_ours_go_upstream() {
        let forward = |name: &str, authoritative| {
            answer(
                &query(name, RecordType::A),
                "cluster.local",
                authoritative,
                web,
            )
        };
        assert_eq!(forward("example.com.", true), Answer::Forward);
        assert_eq!(
            forward("web.default.svc.cluster.localhost.", true),
            Answer::Forward
        );
        // Beside a cluster, its DNS knows its own Services.
        assert_eq!(
            forward("db.default.svc.cluster.local.", false),
            Answer::Forward
        );
        assert!(matches!(
            forward("web.default.svc.cluster.local.", false),
            Answer::Local(_)
        ));
        assert_eq!(
            answer(b"\x01\x02", "cluster.local", true, web),
            Answer::Forward
        );
    }
}
