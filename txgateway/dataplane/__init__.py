"""
The data plane: HTTP/1.1 on llhttp toward clients and backends, and the bytes between them.
"""
