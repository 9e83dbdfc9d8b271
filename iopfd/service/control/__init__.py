"""The control socket (docs/protocol.md): ``transport`` (the socket, its peers and the request/reply
envelope), ``requests`` (what each request must look like) and ``ops`` (what each op does, with the
daemon's ``ControlState``)."""
