"""Load, soak and fault tests of the real engine behind the real app under real uvicorn.

Every test targets 127.0.0.1 only, is bounded in requests and time, and stops by itself.
"""
