"""The link between Alice's host and Bob's host.

Bottom up:

* :mod:`.handshake` -- every TCP connection between the two hosts opens with a
  mutual challenge-response under the pre-shared key; a peer that does not
  speak it is dropped before anything else is read from it.
* :mod:`.mux` -- :class:`~.mux.Link`: one TCP connection carrying several
  numbered channels, each frame numbered and kept until the peer acknowledges
  it, so that a connection that drops and comes back within the link timeout
  loses nothing (the frames in flight are sent again, duplicates dropped).
* :mod:`.transport` -- :class:`~.transport.QueueTransport`, the same blocking
  channel semantics between two threads of one process.
* :mod:`.agreement` -- what the two bench files must agree on, checked when
  the sides meet.
* :mod:`.alice` and :mod:`.bob` -- each host's session: its own instruments,
  its role, its key store; :mod:`.split` runs the three processes of a
  simulated link on one machine.

Authentication of the messages themselves (sequence numbers, tags) is the
job of :class:`qkdctl.auth.AuthenticatedEndpoint`, one per channel, on top of
these transports.
"""
