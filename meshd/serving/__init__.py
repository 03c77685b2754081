"""The serving path: the API, the upstream proxy, the router, the route table and tunnels."""
