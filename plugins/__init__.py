"""Built-in op, optimizer and method plugins, registered through the ``costmodel`` entry-point group."""
