"""
The floor of any Python relay of this load: a bare TCP pipe on epoll, no
HTTP, no Twisted; one recv and one send per chunk, every byte passed as
it came (keep-alive works, as each client connection has its own backend
connection).  ``bench/streams.py``'s ``pipe`` row measures it, so that the
gateway's CPU per chunk can be read against what the system calls alone
cost on this machine.

    python3 bench/streams/pipe.py LISTEN_PORT BACKEND_PORT
"""

import select
import socket
import sys


def main() -> None:
    listen_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(4096)
    server.setblocking(False)
    poller = select.epoll()
    poller.register(server.fileno(), select.EPOLLIN)
    peers: dict[int, socket.socket] = {}
    sockets: dict[int, socket.socket] = {}
    while True:
        for fd, _ in poller.poll():
            if fd == server.fileno():
                accept(server, backend_port, poller, peers, sockets)
                continue
            sock = sockets.get(fd)
            if sock is None:
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                try:
                    peers[fd].sendall(data)
                    continue
                except OSError:
                    pass
            close(fd, poller, peers, sockets)


def accept(server, backend_port, poller, peers, sockets) -> None:
    while True:
        try:
            client, _ = server.accept()
        except BlockingIOError:
            return
        backend = socket.create_connection(("127.0.0.1", backend_port))
        for sock in (client, backend):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sockets[sock.fileno()] = sock
            poller.register(sock.fileno(), select.EPOLLIN)
        peers[client.fileno()], peers[backend.fileno()] = backend, client


def close(fd, poller, peers, sockets) -> None:
    other = peers.pop(fd)
    peers.pop(other.fileno(), None)
    for sock in (sockets.pop(fd), other):
        sockets.pop(sock.fileno(), None)
        poller.unregister(sock.fileno())
        sock.close()


if __name__ == "__main__":
    main()
