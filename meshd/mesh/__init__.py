"""The peer protocol and membership: identity, tokens, TLS peer connections, frames, gossip."""
