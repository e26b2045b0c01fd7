-- placeOrder sent as text, with a staff token, over every customer and product of the
-- shop in turn: orders spread over many streams.
dofile(os.getenv("WRK_LIB"))
