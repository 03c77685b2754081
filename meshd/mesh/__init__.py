"""The peer protocol and membership: identity, tokens (issued: invites; used: joining), TLS peer connections, frames, gossip, addresses."""
