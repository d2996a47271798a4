//! Sans-IO HTTP/1.1 framing (placeholder, being written).
